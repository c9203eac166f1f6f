"""CLI command groups beyond the recipe language; each module registers onto `cli`."""
