import subprocess
import sys


def run(code: str) -> str:
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout.strip()


def test_import_hfquant_is_cheap():
    out = run("import sys, hfquant, hfquant.core, hfquant.nn, hfquant.kernels; "
              "print(sorted(m for m in ('transformers', 'datasets', 'accelerate', 'evaluate') if m in sys.modules))")
    assert out == "[]"


def test_registration_happens_when_transformers_loads_its_registry():
    out = run("import hfquant\nfrom transformers import AutoModelForCausalLM\n"
              "from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING, AUTO_QUANTIZATION_CONFIG_MAPPING\n"
              "print(AUTO_QUANTIZER_MAPPING['hfquant'].__name__, AUTO_QUANTIZATION_CONFIG_MAPPING['hfquant'].__name__)")
    assert out == "HFQuantQuantizer HFQuantConfig"


def test_registration_when_transformers_was_imported_first():
    out = run("import transformers.quantizers.auto as a\nimport hfquant\nprint('hfquant' in a.AUTO_QUANTIZER_MAPPING)")
    assert out == "True"


def test_reimport_does_not_fail():
    out = run("import importlib, hfquant, hfquant.integrations.transformers as t\n"
              "importlib.reload(t)\nprint('ok')")
    assert out == "ok"
