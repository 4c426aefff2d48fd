"""Push to a local Hub server (tests/hub_server.py) with huggingface_hub, download back, same logits."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from helpers import run_cli, write_recipe
from hub_server import LocalHub

TOKEN = "hf_test_write_token_0123456789"


@pytest.fixture(scope="module")
def output_folder(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("hub")
    recipe = write_recipe(root / "r.yaml", tiny_models["llama"], root / "out", evaluation={"before": False, "after": False})
    from hfquant.app.cli import main

    assert main(["--quiet", "run", str(recipe)]) == 0
    return root / "out"


def _env(tmp_path, hub, token):
    env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_TOKEN": token, "HF_HUB_OFFLINE": "0",
           "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_DISABLE_TELEMETRY": "1"}
    env.pop("HF_HUB_ENABLE_HF_TRANSFER", None)
    return env


def _push(folder, repo, env, *extra):
    return subprocess.run([sys.executable, "-m", "hfquant", "--quiet", "push", str(folder), repo, *extra],
                          env=env, capture_output=True, text=True, timeout=300)


DOWNLOAD = textwrap.dedent("""
    import json, sys, torch
    import hfquant
    from pathlib import Path
    from huggingface_hub import hf_hub_download
    from transformers import AutoModelForCausalLM
    repo, local, cache = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
    paths = [hf_hub_download(repo, f.name, revision=sys.argv[4], cache_dir=cache) for f in sorted(local.iterdir())]
    remote = Path(paths[0]).parent
    texts = ("README.md", "hfquant_recipe.yaml", "report.json")  # uploaded with local paths redacted
    same_bytes = all(Path(p).read_bytes() == (local / Path(p).name).read_bytes() for p in paths
                     if Path(p).name not in texts)
    ids = torch.randint(0, 300, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = AutoModelForCausalLM.from_pretrained(local).eval()(input_ids=ids).logits
        b = AutoModelForCausalLM.from_pretrained(remote).eval()(input_ids=ids).logits
    print(json.dumps({"files": len(paths), "same_bytes": same_bytes, "same_logits": torch.equal(a, b)}))
""")


def test_push_round_trip_with_a_transient_500(output_folder, tmp_path, tiny_models):
    with LocalHub(TOKEN) as hub:
        hub.state.fail = [("create", 500), ("branch", 503)]
        proc = _push(output_folder, "someone/tiny-gptq", _env(tmp_path, hub, TOKEN), "--revision", "w4g32")
        assert proc.returncode == 0, (proc.stderr[-3000:], hub.state.calls)
        assert TOKEN not in proc.stdout + proc.stderr
        calls = [c for c in hub.state.calls]
        assert calls[:4] == [("create", 500), ("create", 200), ("branch", 503), ("branch", 200)], calls
        assert ("commit", 200) in calls
        repo = hub.state.repos["someone/tiny-gptq"]
        assert repo["private"] is True
        uploaded = repo["branches"]["w4g32"]["files"]
        local = {p.name for p in output_folder.iterdir()}
        assert set(uploaded) == local and {"report.json", "hfquant_recipe.yaml", "README.md"} <= local
        card = uploaded["README.md"].decode()
        assert card.startswith("---\n") and "hfquant" in card and "from_pretrained" in card
        # No local path is published (before, the card, recipe and report named the model's absolute path); the
        # local files are unchanged, and every other file is uploaded byte for byte.
        texts = ("README.md", "hfquant_recipe.yaml", "report.json")
        model_dir = str(tiny_models["llama"])
        for name in texts:
            local_text = (output_folder / name).read_text()
            assert model_dir in local_text or name == "README.md"
            remote = uploaded[name].decode()
            assert model_dir not in remote and str(output_folder) not in remote and str(Path.home()) not in remote, name
            assert remote == local_text.replace(model_dir, "llama").replace(str(output_folder), "out"), name

        proc = subprocess.run([sys.executable, "-c", DOWNLOAD, "someone/tiny-gptq", str(output_folder),
                               str(tmp_path / "dl"), "w4g32"], env=_env(tmp_path, hub, TOKEN),
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        assert result == {"files": len(local), "same_bytes": True, "same_logits": True}


def test_push_with_a_bad_token_fails_clearly(output_folder, tmp_path):
    bad = "hf_not_the_right_token_987"
    with LocalHub(TOKEN) as hub:
        proc = _push(output_folder, "someone/tiny-gptq", _env(tmp_path, hub, bad))
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(lines) == 1 and "HTTP 401" in lines[0] and "HF_TOKEN" in lines[0], lines
    assert bad not in proc.stdout + proc.stderr and "Traceback" not in proc.stderr
    assert hub.state.repos == {}


def test_push_gives_up_after_repeated_server_errors(output_folder, tmp_path, capsys, monkeypatch):
    from hfquant.app import hub as hub_module

    with LocalHub(TOKEN) as hub:
        hub.state.fail = [("create", 500)] * 10
        monkeypatch.setattr(hub_module.time, "sleep", lambda s: None)
        with pytest.raises(hub_module.HubError) as err:
            hub_module._call("creating repo", "a/b", lambda: _raise_500(), attempts=3, wait=0.0)
    assert "after 3 attempts" in str(err.value) and "HTTP 500" in str(err.value)
    code, _, stderr = run_cli(["push", output_folder, "someone/x"], capsys)  # HF_HUB_OFFLINE=1 in the tests
    assert code == 1 and "HF_HUB_OFFLINE" in stderr and len(stderr.strip().splitlines()) == 1


class _ServerError(Exception):
    class response:  # shaped like an HTTP response
        status_code = 500


def _raise_500():
    raise _ServerError("500 Server Error")


def test_push_of_a_gguf_run_folder(tiny_models, tmp_path):
    """issue 31, 5: an ``hfquant run`` folder whose checkpoint is ``model.gguf`` (no config.json) is pushed whole."""
    pytest.importorskip("gguf")
    from hfquant.app.cli import main

    recipe = write_recipe(tmp_path / "r.yaml", tiny_models["llama"], tmp_path / "out",
                          quantization={"method": "rtn", "gguf_type": "Q4_0", "save_format": "gguf"},
                          evaluation={"before": False, "after": False})
    assert main(["--quiet", "run", str(recipe)]) == 0
    local = {p.name for p in (tmp_path / "out").iterdir()}
    assert "model.gguf" in local and "config.json" not in local
    with LocalHub(TOKEN) as hub:
        proc = _push(tmp_path / "out", "someone/tiny-gguf", _env(tmp_path, hub, TOKEN))
        assert proc.returncode == 0, proc.stderr[-3000:]
        uploaded = hub.state.repos["someone/tiny-gguf"]["branches"]["main"]["files"]
    assert set(uploaded) == local
    assert uploaded["model.gguf"] == (tmp_path / "out" / "model.gguf").read_bytes()
