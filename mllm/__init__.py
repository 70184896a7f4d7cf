"""LLaVA-1.5 on an LLM2CLIP vision tower.

`mllm.builder` assembles a plain `LlavaForConditionalGeneration` (vision tower, 2-layer GELU projector,
causal LM) and its `LlavaProcessor`; `mllm.data` reads LLaVA's JSON formats and masks the labels;
`mllm.templates` holds the prompt formats; `mllm.train` runs the projector pretraining and the
instruction tuning on the transformers Trainer; `mllm.export` writes the final plain HF Llava
directory. `mllm.cli` is the `mllm` console script.
"""
