"""The GPU check command, rehearsed on CPU with a small backbone and fp16 (the GPU's default)."""
import trainers  # noqa: F401  (registers the trainers)
from selftpt import gpu_check


def test_gpu_check_runs_every_selected_trainer_and_reports_each(capsys):
    code = gpu_check.main(["--device", "cpu", "--arch", "Bench-RN-T", "--classes", "70", "--images", "1",
                           "--steps", "1", "--tta-steps", "1", "--precision", "fp16",
                           "--methods", "CoOp", "TPT", "SelfTPT"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "3 passed, 0 failed" in out
    for method in ("CoOp", "TPT", "SelfTPT"):
        assert f"{method}: ok" in out
    assert "fp16" in out and "70" in out


def test_gpu_check_without_a_gpu_says_so_in_one_line(capsys, monkeypatch):
    monkeypatch.setattr(gpu_check.torch.cuda, "is_available", lambda: False)
    assert gpu_check.main([]) == 2
    assert capsys.readouterr().out.strip().startswith("error: no CUDA device here")
