"""Run settings: one frozen dataclass per config section, each knob defined once."""

import dataclasses
import subprocess
import sys

import pytest

from mopd_jax import settings
from tests.conftest import load_config


def test_every_default_is_valid_and_every_section_is_built():
  st = settings.from_config(settings.base_config())
  for name, cls in settings.SECTIONS.items():
    assert isinstance(getattr(st, name), cls)
  # Hashable: the step takes the sections as static configuration.
  hash(st)


def test_config_file_sections_have_exactly_the_dataclass_fields():
  """A knob added to a settings dataclass appears in the config file by itself."""
  config = load_config()
  for name, cls in settings.SECTIONS.items():
    assert set(config[name].keys()) == {f.name for f in dataclasses.fields(cls)}, name
  top = {k for k in config.keys() if k not in settings.SECTIONS}
  assert top == {f.name for f in dataclasses.fields(settings.RunSettings)}


def test_unknown_keys_are_named():
  config = load_config()
  config.loss.unlock()
  config.loss.alhpa = 0.3
  with pytest.raises(settings.ConfigError, match=r"config\.loss\.alhpa"):
    settings.from_config(config)
  config = load_config()
  config.unlock()
  config.algoritm = "grpo"
  with pytest.raises(settings.ConfigError, match=r"config\.algoritm"):
    settings.from_config(config)


@pytest.mark.parametrize("key,value,match", [
    ("algorithm.name", "ppo", r"config\.algorithm\.name = 'ppo'.*mopd"),
    ("loss.temperature", 0.0, r"config\.loss\.temperature = 0\.0.*> 0"),
    ("optim.b2", 1.0, r"config\.optim\.b2 = 1\.0.*\[0, 1\)"),
    ("mesh.shape", (-1, -1, 1), r"at most one -1"),
    ("verifier.max_workers", 0, r"verifier\.max_workers = 0"),
    ("total_steps", -1, r"config\.total_steps = -1"),
    ("sampling.num_samples", 0, r"sampling\.num_samples = 0.*positive"),
    ("sampling.decode_layers", "loop", r"sampling\.decode_layers = 'loop'.*'unrolled'"),
])
def test_invalid_values_name_key_value_and_allowed(key, value, match):
  with pytest.raises(settings.ConfigError, match=match):
    settings.from_config(load_config(**{key: value}))


def test_distillation_temperature_is_its_own_knob():
  st = settings.from_config(load_config(**{"loss.temperature": 0.5}))
  assert st.loss.temperature == 0.5 and st.sampling.temperature == 1.0


def test_teacher_ema_rate_applies_only_in_ema_mode():
  assert settings.TeacherSettings(mode="ema", ema_rate=0.1).ema == 0.1
  assert settings.TeacherSettings(mode="frozen", ema_rate=0.1).ema == 0.0


def test_command_line_sets_knobs_that_only_settings_define(tmp_path):
  """ml_collections flags reach a knob (and a None-default one) through the config file."""
  script = (
      "import sys\n"
      "from absl import flags\n"
      "from ml_collections import config_flags\n"
      "from mopd_jax import settings\n"
      "_C = config_flags.DEFINE_config_file('config')\n"
      "flags.FLAGS(sys.argv)\n"
      "st = settings.from_config(_C.value)\n"
      "print(st.loss.temperature, st.data.cache_dir, st.verifier.max_workers)\n")
  out = subprocess.run(
      [sys.executable, "-c", script, "--config=configs/code.py",
       "--config.loss.temperature=0.7", f"--config.data.cache_dir={tmp_path}",
       "--config.verifier.max_workers=3"],
      capture_output=True, text=True, check=True, timeout=120)
  assert out.stdout.split() == ["0.7", str(tmp_path), "3"]
