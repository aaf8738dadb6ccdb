"""ToyWorld, the lab's embedded data: ``toyworld`` (procedural scenes, captions, questions and class tasks
with exact ground truth), ``tokenizer`` (its word-level tokenizer) and ``bench`` (how fast it renders)."""
