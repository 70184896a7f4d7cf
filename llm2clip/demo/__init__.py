"""`llm2clip demo`: the whole LLM2CLIP story in one command, then one report.

config: the demo's config (configs/demo.yaml) and its profiles. steps: the step table, each step a
command line of the existing CLIs. state: demo_state.json, which steps are finished and which to redo.
runner: runs the steps as subprocesses with per-step logs. report, figures: report.md/json and PNGs.
"""
