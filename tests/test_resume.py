"""A stopped run, rerun, continues where it stopped."""

from __future__ import annotations

from llm2clip.training import TrainSettings, resume_checkpoint


def test_a_checkpoint_the_kill_cut_short_is_passed_over(tmp_path):
    checkpoints = tmp_path / "checkpoints"
    for step, state in ((2, "{}"), (4, "{}"), (6, "")):  # killed while writing checkpoint 6's trainer state
        (checkpoints / f"checkpoint-{step}").mkdir(parents=True)
        (checkpoints / f"checkpoint-{step}" / "trainer_state.json").write_text(state)
    (checkpoints / "checkpoint-8").mkdir()  # killed before writing it
    (checkpoints / "tokenizer").mkdir()
    assert resume_checkpoint(TrainSettings(), checkpoints) == str(checkpoints / "checkpoint-4")
    assert resume_checkpoint(TrainSettings(resume=False), checkpoints) is None
    assert resume_checkpoint(TrainSettings(), tmp_path / "none") is None
