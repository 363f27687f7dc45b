"""Classification (method.md 4): representation head over cached teacher tokens, then self-distilled students.

teacher-tokens  ->  tokens.cache_run_tokens: each split's token cache (a stage-1 job) + class prompts (prompts.py)
rephead         ->  experiment.run_step1: head (text) + linear probe (no text) -> soft targets (teacher_training)
self-distill    ->  experiment.run_step2: fresh students of the teacher's image architecture, generations
                    (student_training)
"""
