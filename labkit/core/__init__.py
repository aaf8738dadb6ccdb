"""The lab's core, which knows no method: ``device`` (CUDA, MPS, CPU; bf16 autocast; seeds), ``blocks``
(transformer blocks whose attention returns its maps and takes masks and head/FFN gates), ``train`` (the one
training loop, and fast mode), ``checkpoint`` (the one checkpoint format), ``assets`` (the shipped
checkpoints) and ``viz`` (plotting helpers shared by notebooks and the demo)."""
