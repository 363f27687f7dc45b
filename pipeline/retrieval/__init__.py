"""Stage 3: Recall@K/RSUM, FAISS indexes, evaluation of teachers and students, reports and search."""
