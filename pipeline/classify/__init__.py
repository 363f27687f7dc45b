"""Classification (method.md 4): representation head over cached teacher tokens, then self-distilled students.

teacher-tokens  ->  extract.cache_split_tokens / cache_prompts   (token cache, store.py)
rephead         ->  experiment.run_step1: head (text) + linear probe (no text) -> soft targets (teacher_training.py)
self-distill    ->  experiment.run_step2: fresh students of the teacher's image architecture, generations
"""
