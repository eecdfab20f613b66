"""Prompt data: loading and validating prompt files, and generating GenEval-style training prompts.

See docs/data-and-checkpoints.md for the schemas.
"""

from .geneval import COCO_CLASSES, COLORS, GENEVAL_TAGS, evaluation_prompts, generate_geneval_prompts, write_geneval_prompts
from .prompts import SCHEMAS, PromptFileError, load_prompt_file, prompts_and_metadata, read_prompts

__all__ = [
    "COCO_CLASSES", "COLORS", "GENEVAL_TAGS", "SCHEMAS", "PromptFileError", "evaluation_prompts",
    "generate_geneval_prompts", "load_prompt_file", "prompts_and_metadata", "read_prompts", "write_geneval_prompts",
]
