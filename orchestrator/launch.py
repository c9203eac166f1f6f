"""How one stage is launched: its argv, its environment and (train stages) its spec.json.

Train stages: `python -m phi4core train SPEC.json`, under torchrun (`python -m
phi4core.elastic`) when the stage has more than one process. Command stages: their `cmd:` as
given, no shell. Both see:
    PHI4_STAGE_DIR    the stage's folder in the store (logs, scratch, checkpoints/)
    PHI4_OUTPUT_DIR   where to write each declared output as <artifact>/ (published on exit 0)
    PHI4_INPUT_<NAME> the folder of each input
    PHI4_SPEC         (train stages) the resolved spec
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

from phi4core.config import InputSpec, StageSpec

from .config import LoadedRecipe
from .config.checks import expand_groups, model_of
from .store import Attempt


@dataclass(frozen=True)
class ResolvedInput:
    source: str  # stage | path | hf
    path: str
    frozen: bool
    artifact: str | None = None
    stage: str | None = None
    fingerprint: str | None = None  # of the upstream stage attempt


# torchrun, with the trainer's way of stopping: signals passed on to the workers, exit 75
# when they all checkpointed (phi4core/elastic.py).
TORCHRUN = "phi4core.elastic"


def command(loaded: LoadedRecipe, attempt: Attempt) -> list[str]:
    recipe = loaded.recipe
    if recipe.kind == "command":
        return list(recipe.cmd or [])
    nproc = recipe.resources.world_size
    train = ["-m", "phi4core", "train", str(attempt.spec)]
    if nproc == 1:
        return [sys.executable, *train]
    # --standalone: a free rendezvous port, so stages side by side (--jobs) do not collide.
    return [sys.executable, "-m", TORCHRUN, "--standalone", "--nproc_per_node", str(nproc),
            *train]


def environment(loaded: LoadedRecipe, attempt: Attempt,
                inputs: dict[str, ResolvedInput]) -> dict[str, str]:
    """What the stage adds to the inherited environment (the recipe's `env` last)."""
    env = {
        "PHI4_STAGE": loaded.recipe.name,
        "PHI4_FINGERPRINT": attempt.fingerprint,
        "PHI4_STAGE_DIR": str(attempt.dir),
        "PHI4_OUTPUT_DIR": str(attempt.staging),
    }
    if loaded.recipe.kind == "train":
        env["PHI4_SPEC"] = str(attempt.spec)
    for name, inp in inputs.items():
        env[f"PHI4_INPUT_{name.upper()}"] = inp.path
    env.update(loaded.recipe.env)
    return env


def spec_document(loaded: LoadedRecipe, attempt: Attempt,
                  inputs: dict[str, ResolvedInput]) -> dict:
    """What goes into spec.json: the trainer's StageSpec, or for a command stage the same
    facts about what it was given (a record; the command reads its environment)."""
    if loaded.recipe.kind == "train":
        return spec(loaded, attempt, inputs).model_dump(mode="json")
    recipe = loaded.recipe
    return {"name": recipe.name, "kind": "command", "fingerprint": attempt.fingerprint,
            "cmd": recipe.cmd, "env": recipe.env, "outputs": recipe.outputs,
            "inputs": {name: {"source": i.source, "path": i.path, "artifact": i.artifact,
                              "frozen": i.frozen} for name, i in inputs.items()},
            "stage_dir": str(attempt.dir), "output_dir": str(attempt.staging)}


def spec(loaded: LoadedRecipe, attempt: Attempt, inputs: dict[str, ResolvedInput]) -> StageSpec:
    recipe = loaded.recipe
    model = model_of(recipe)
    assert model is not None and recipe.data is not None and recipe.train is not None
    groups = model.module_groups
    return StageSpec(
        name=recipe.name,
        fingerprint=attempt.fingerprint,
        model=model,
        tokenizer=recipe.tokenizer,
        inputs={name: InputSpec(source=i.source, path=i.path, artifact=i.artifact,
                                frozen=i.frozen) for name, i in inputs.items()},
        outputs=recipe.outputs,
        trainable=sorted(expand_groups(recipe.trainable, groups)),
        frozen=sorted(expand_groups(recipe.frozen, groups)),
        data=recipe.data,
        train=recipe.train,
        parallel=recipe.parallel,
        precision=recipe.precision,
        logging=recipe.logging,
        world_size=recipe.resources.world_size,
        stage_dir=str(attempt.dir),
        output_dir=str(attempt.staging),
    )
