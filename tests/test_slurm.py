"""The SLURM launcher's settings (``selftpt.slurm``); the sweeps on a real cluster are in
``test_slurm_cluster.py``."""
from __future__ import annotations

import pytest

from selftpt.slurm import SlurmError, SlurmSettings, parse_time, read_settings


@pytest.mark.parametrize("text, minutes", [
    ("90", 90), ("5:30", 6), ("5:00", 5), ("2:00:00", 120), ("1:30:01", 91),
    ("1-0", 1440), ("1-2", 1560), ("1-2:30", 1590), ("2-00:00:30", 2881),
])
def test_time_limits_read_as_sbatch_reads_them(text, minutes):
    assert parse_time(text) == minutes


@pytest.mark.parametrize("text", ["", "1h", "1:2:3:4", "-5", "1-"])
def test_a_time_limit_sbatch_would_not_read_is_one_line_naming_the_variable(text):
    with pytest.raises(SlurmError, match=r"^SUBMIT_TIME .* is not a time limit; use minutes or \[D-\]HH:MM\[:SS\]$"):
        parse_time(text)


def test_no_settings_leave_every_choice_to_the_cluster():
    settings = read_settings(environ={})
    assert settings == SlurmSettings()
    assert (settings.partition, settings.cpus, settings.mem, settings.gpus) == (None, None, None, 0)


def test_environment_variables_win_over_the_yaml_file(tmp_path):
    config = tmp_path / "slurm.yaml"
    config.write_text("partition: gpu\ntime: '2:00:00'\ngpus: 1\ncpus: 8\nmem: 32G\nqos: normal\n"
                      "setup:\n  - module load cuda/12.1\n  - echo ready\n")
    settings = read_settings(environ={"SUBMIT_CONFIG": str(config), "SUBMIT_PARTITION": "a100",
                                      "SUBMIT_SBATCH": "--constraint=a100 --exclusive"})
    assert settings.partition == "a100"  # the variable
    assert (settings.time_min, settings.gpus, settings.cpus, settings.mem, settings.qos) == (120, 1, 8, "32G", "normal")
    assert settings.setup == ("module load cuda/12.1", "echo ready")
    assert dict(settings.sbatch) == {"constraint": "a100", "exclusive": True}
    assert "partition a100" in settings.describe() and "--constraint=a100" in settings.describe()


@pytest.mark.parametrize("environ, message", [
    ({"SUBMIT_GPUS": "two"}, r"^SUBMIT_GPUS 'two' is not a whole number$"),
    ({"SUBMIT_SBATCH": "-C a100"}, r"^SUBMIT_SBATCH: '-C' is not a long #SBATCH option"),
    ({"SUBMIT_CONFIG": "/nonexistent/slurm.yaml"}, r"^SUBMIT_CONFIG /nonexistent/slurm.yaml: cannot read it"),
])
def test_bad_settings_are_one_line_before_anything_is_submitted(environ, message):
    with pytest.raises(SlurmError, match=message):
        read_settings(environ=environ)


def test_unknown_keys_in_the_yaml_file_are_named(tmp_path):
    config = tmp_path / "slurm.yaml"
    config.write_text("partition: gpu\npartiton: cpu\n")
    with pytest.raises(SlurmError, match=r"unknown settings partiton; known: partition, time"):
        read_settings(environ={}, config_file=config)
