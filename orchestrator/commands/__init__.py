"""The `phi4` commands, one module per group of them; cli.py registers each by name.

Invariants: a command module imports click and commands.common at start-up, nothing heavy
(torch, megatron, an executor) before its command runs; it reads the store through the store
and executor modules and writes nothing there itself.
"""
