"""The recipe language: schema, loading (extends, profiles, overrides), checks and errors."""

from .errors import ConfigError, Origin, Problem
from .loader import LoadedPipeline, LoadedRecipe, load_any, load_pipeline, load_recipe
from .schema import Input, Pipeline, Recipe, Resources

__all__ = [
    "ConfigError", "Origin", "Problem", "LoadedPipeline", "LoadedRecipe", "load_any",
    "load_pipeline", "load_recipe", "Input", "Pipeline", "Recipe", "Resources",
]
