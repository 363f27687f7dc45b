"""Image-text representation head + self-distillation for classification (method.md 4).

teacher-tokens  ->  extract.cache_split_tokens / cache_prompts   (token cache, store.py)
rephead         ->  experiment.run_step1: head (text) + linear probe (no text) -> soft targets
self-distill    ->  experiment.run_step2: fresh students of the teacher's image architecture, generations
"""

from pipeline.rephead.config import ClassifyConfig
from pipeline.rephead.experiment import run_step1, run_step2
from pipeline.rephead.extract import cache_prompts, cache_split_tokens, token_extractor
from pipeline.rephead.head import LinearProbe, RepresentationHead, soft_cross_entropy, topk_accuracy
from pipeline.rephead.labels import class_list, labelled_images, sample_few_shot
from pipeline.rephead.report import classification_table
from pipeline.rephead.store import TokenSplit
from pipeline.rephead.student import ImageClassifier, load_classifier

__all__ = [
    "ClassifyConfig",
    "run_step1",
    "run_step2",
    "cache_prompts",
    "cache_split_tokens",
    "token_extractor",
    "RepresentationHead",
    "LinearProbe",
    "soft_cross_entropy",
    "topk_accuracy",
    "class_list",
    "labelled_images",
    "sample_few_shot",
    "classification_table",
    "TokenSplit",
    "ImageClassifier",
    "load_classifier",
]
