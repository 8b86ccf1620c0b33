"""Models from the Hugging Face hub, through the real ``huggingface_hub`` client against a stand-in hub on
loopback (``HF_ENDPOINT``): serve by repo id, the cache reused offline, gated repos, wrong revisions and repos with
nothing Flotilla can load — each failure a non-zero exit with one line that says what to do."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import torch

from flotilla.engine.model_source import ModelRef, ModelSourceError, parse_model_uri
from hub_standin import HubStandIn, Repo
from server_process import ServerProcess

REPO = "flotilla-test/tiny-llama"
GATED = "flotilla-test/gated-llama"
BIN_ONLY = "flotilla-test/bin-only"
GGUF = "flotilla-test/smollm2-gguf"
TOKEN = "hf_standin_secret"


@pytest.fixture(scope="module")
def hub(tiny_llama, tmp_path_factory):
    # The public repo also carries what serving must never fetch: PyTorch pickles and Meta's original/ files.
    public = tmp_path_factory.mktemp("hub-public")
    shutil.copytree(tiny_llama, public, dirs_exist_ok=True)
    (public / "pytorch_model.bin").write_bytes(b"not for us")
    (public / "original").mkdir()
    (public / "original" / "consolidated.00.pth").write_bytes(b"not for us either")
    bin_only = tmp_path_factory.mktemp("hub-bin-only")
    shutil.copy(tiny_llama / "config.json", bin_only / "config.json")
    (bin_only / "pytorch_model.bin").write_bytes(b"pickle")
    # A GGUF repo as they come: several quantizations side by side (links to the bundled file stand in for them).
    from flotilla.engine.model_loader import bundled_model_path

    quants = tmp_path_factory.mktemp("hub-gguf")
    for name in ("SmolLM2-135M-Instruct-Q4_1.gguf", "SmolLM2-135M-Instruct-Q8_0.gguf", "SmolLM2-1.7B-Q8_0.gguf"):
        (quants / name).symlink_to(bundled_model_path())
    (quants / "README.md").write_text("quantized with llama.cpp")
    standin = HubStandIn({
        GGUF: Repo({"main": quants}),
        REPO: Repo({"main": public, "v1.0": tiny_llama}),
        GATED: Repo({"main": tiny_llama}, token=TOKEN),
        BIN_ONLY: Repo({"main": bin_only}),
    }).start()
    yield standin
    standin.stop()


def hub_env(hub, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    return {**env, "HF_ENDPOINT": hub.url, "HF_HUB_DISABLE_TELEMETRY": "1", **extra}


def failure_line(done: subprocess.CompletedProcess) -> str:
    """A failed command's last stderr line (above it there may be a progress bar, never a traceback)."""
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    return done.stderr.strip().splitlines()[-1]


def download(hub, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flotilla.engine.cli", "download", *args], capture_output=True,
                          text=True, env=hub_env(hub, **env), timeout=300, cwd="/")


@pytest.mark.parametrize("arg, revision, expected", [
    ("meta-llama/Llama-3.1-8B-Instruct", None, ModelRef("hf", "meta-llama/Llama-3.1-8B-Instruct")),
    ("hf://Qwen/Qwen2.5-0.5B@v1.0", None, ModelRef("hf", "Qwen/Qwen2.5-0.5B", "v1.0")),
    ("Qwen/Qwen2.5-0.5B", "abc123", ModelRef("hf", "Qwen/Qwen2.5-0.5B", "abc123")),
    ("s3://models/llama/8b/", None, ModelRef("s3", "s3://models/llama/8b")),
    ("/", None, ModelRef("local", "/")),
    ("hf://org/x-GGUF:Q4_K_M@v2", None, ModelRef("hf", "org/x-GGUF", "v2", "Q4_K_M")),
    ("org/x-GGUF:x-Q8_0.gguf", None, ModelRef("hf", "org/x-GGUF", None, "x-Q8_0.gguf")),
])
def test_model_arguments_are_classified(arg, revision, expected):
    assert parse_model_uri(arg, revision) == expected


@pytest.mark.parametrize("arg, revision", [("not a repo", None), ("a/b/c", None), ("org/name@v1", "v2"), ("s3://", None), ("org/name:a/b.gguf", None)])
def test_malformed_model_arguments_are_refused(arg, revision):
    with pytest.raises(ModelSourceError, match="^model: "):
        parse_model_uri(arg, revision)


def test_download_fetches_only_what_serving_needs(hub, tmp_path):
    done = download(hub, REPO, "--to", str(tmp_path))
    assert done.returncode == 0, done.stderr
    folder = Path(done.stdout.strip().splitlines()[-1])
    names = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
    assert "config.json" in names and "model.safetensors" in names and "tokenizer.json" in names
    assert not {"pytorch_model.bin", "original/consolidated.00.pth"} & names
    assert folder.is_relative_to(tmp_path)


def test_serve_a_pinned_repo_then_again_offline_from_the_cache(hub, tmp_path, tiny_llama):
    from flotilla.engine import LLM, SamplingParams

    args = [REPO + "@v1.0", "--download-dir", str(tmp_path), "--dtype", "float32", "--served-model-name", "tiny"]
    body = {"model": "tiny", "prompt": [5, 6, 7, 8], "max_tokens": 8, "temperature": 0, "ignore_eos": True}
    local = LLM(str(tiny_llama), dtype="float32").generate(
        {"prompt_token_ids": body["prompt"]}, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True),
        use_tqdm=False)[0].outputs[0].text
    for env in ({}, {"HF_HUB_OFFLINE": "1"}):
        before = len(hub.requests)
        proc = ServerProcess(args, env=hub_env(hub, **env), clean_env=True).wait_ready()
        try:
            r = httpx.post(f"{proc.base}/v1/completions", json=body, timeout=60)
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["text"] == local  # the weights of tag v1.0, as served from disk
        finally:
            assert proc.stop() == 0
        if env:
            assert hub.requests[before:] == []  # offline: not one request reached the hub
        else:
            assert any(m == "GET" and p.endswith("/model.safetensors") for m, p in hub.requests[before:])


def test_a_gguf_repo_downloads_one_quantization_and_converts_it(hub, tmp_path, smollm2_dir):
    from safetensors.torch import load_file

    from flotilla.engine.model_loader import bundled_model_path

    report = tmp_path / "report.json"
    done = download(hub, GGUF + ":q4_1", "--to", str(tmp_path / "hub"), "--report", str(report),
                    FLOTILLA_CACHE=str(tmp_path / "flotilla"))
    assert done.returncode == 0, done.stderr
    fetched = [p for m, p in hub.requests if m == "GET" and "/resolve/" in p and p.startswith(f"/{GGUF}/")]
    assert [p.rsplit("/", 1)[-1] for p in fetched] == ["SmolLM2-135M-Instruct-Q4_1.gguf"]  # nothing else
    facts = json.loads(report.read_text())
    folder = Path(facts["path"])
    assert folder == Path(done.stdout.strip().splitlines()[-1]) and folder.is_relative_to(tmp_path / "flotilla")
    assert facts["bytes"] == Path(bundled_model_path()).stat().st_size and facts["seconds"] >= 0
    # the same tensors as the conversion of the bundled file itself
    ours, reference = load_file(folder / "model.safetensors"), load_file(smollm2_dir / "model.safetensors")
    assert ours.keys() == reference.keys() and all(torch.equal(ours[k], reference[k]) for k in ours)


@pytest.mark.parametrize("selector, says", [
    (":Q8_0", "matches several GGUF files"),
    (":Q4_K_M", "has no GGUF file matching 'Q4_K_M'"),
])
def test_a_gguf_selector_that_is_not_one_file_says_how_to_name_one(hub, tmp_path, selector, says):
    report = tmp_path / "report.json"
    done = download(hub, GGUF + selector, "--to", str(tmp_path), "--report", str(report))
    assert says in failure_line(done)
    assert says in json.loads(report.read_text())["error"]


def test_a_gated_repo_needs_hf_token(hub, tmp_path):
    refused = download(hub, GATED, "--to", str(tmp_path))
    assert "HF_TOKEN" in failure_line(refused)
    allowed = download(hub, GATED, "--to", str(tmp_path), HF_TOKEN=TOKEN)
    assert allowed.returncode == 0, allowed.stderr


@pytest.mark.parametrize("args, says", [
    ([REPO, "--revision", "no-such-branch"], "revision 'no-such-branch'"),
    ([REPO + "@no-such-tag"], "revision 'no-such-tag'"),
    (["flotilla-test/does-not-exist"], "was not found"),
    ([BIN_ONLY], "no *.safetensors"),
])
def test_download_failures_exit_non_zero_with_one_line(hub, tmp_path, args, says):
    done = download(hub, *args, "--to", str(tmp_path))
    assert says in failure_line(done)


def test_offline_without_a_cached_copy_says_so(hub, tmp_path):
    before = len(hub.requests)
    done = download(hub, REPO, "--to", str(tmp_path), HF_HUB_OFFLINE="1")
    assert "is not in the cache and HF_HUB_OFFLINE is set" in failure_line(done)
    assert hub.requests[before:] == []


def test_an_unreachable_hub_says_what_to_do(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    done = subprocess.run([sys.executable, "-m", "flotilla.engine.cli", "download", REPO, "--to", str(tmp_path)],
                          capture_output=True, text=True, timeout=300, cwd="/",
                          env={**env, "HF_ENDPOINT": "http://127.0.0.1:9"})  # nothing listens on the discard port
    assert "cannot reach" in failure_line(done) and "HF_HUB_OFFLINE=1" in done.stderr


def test_serve_exits_non_zero_when_the_repo_is_missing(hub, tmp_path):
    proc = ServerProcess(["flotilla-test/does-not-exist", "--download-dir", str(tmp_path)], env=hub_env(hub),
                         clean_env=True)
    try:
        assert proc.proc.wait(timeout=120) == 1
    finally:
        proc.stop()  # never leave a server behind, whatever the outcome


# ---- S3, through boto3 against moto's server mode (the real S3 wire protocol on loopback) -----------------


@pytest.fixture(scope="module")
def s3(tiny_llama):
    from moto.server import ThreadedMotoServer

    from server_process import free_port

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    import boto3

    client = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], aws_access_key_id="testing",
                          aws_secret_access_key="testing", region_name="us-east-1")
    client.create_bucket(Bucket="models")
    for path in tiny_llama.rglob("*"):
        if path.is_file():
            client.upload_file(str(path), "models", f"tiny/llama/{path.relative_to(tiny_llama).as_posix()}")
    client.put_object(Bucket="models", Key="tiny/llama/pytorch_model.bin", Body=b"never fetched")
    yield env
    server.stop()


def test_serve_from_s3(s3, tmp_path, tiny_llama):
    proc = ServerProcess(["s3://models/tiny/llama", "--download-dir", str(tmp_path), "--dtype", "float32",
                          "--served-model-name", "tiny"], env=s3).wait_ready()
    try:
        r = httpx.post(f"{proc.base}/v1/chat/completions", timeout=60,
                       json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})
        assert r.status_code == 200, r.text
    finally:
        assert proc.stop() == 0
    fetched = {p.name for p in (tmp_path / "models" / "tiny" / "llama").rglob("*") if p.is_file()}
    assert "model.safetensors" in fetched and "pytorch_model.bin" not in fetched


@pytest.mark.parametrize("uri, env, says", [
    ("s3://models/no/such/prefix", {}, "nothing to serve under"),
    ("s3://no-such-bucket/x", {}, "S3 refused"),
    ("s3://models/tiny/llama", {"AWS_ACCESS_KEY_ID": None, "AWS_SECRET_ACCESS_KEY": None}, "no AWS credentials"),
])
def test_s3_failures_exit_non_zero_with_one_line(s3, tmp_path, uri, env, says):
    merged = {**os.environ, **s3, **env, "HOME": str(tmp_path)}  # no ~/.aws to fall back on
    done = subprocess.run([sys.executable, "-m", "flotilla.engine.cli", "download", uri, "--to", str(tmp_path)],
                          capture_output=True, text=True, timeout=300, cwd="/",
                          env={k: v for k, v in merged.items() if v is not None})
    assert says in failure_line(done)


def test_a_converted_gguf_is_readable_by_every_user(smollm2_dir):
    # The CPU image converts the bundled GGUF at build time as root and serves it as uid 1000; safetensors
    # writes owner-only files, which left the engine unable to open its own weights.
    for path in [smollm2_dir, *smollm2_dir.iterdir()]:
        mode = path.stat().st_mode & 0o777
        assert mode & 0o004 and (not path.is_dir() or mode & 0o001), (path, oct(mode))


def test_a_prebuilt_conversion_is_used_read_only_and_new_ones_go_to_the_writable_cache(smollm2_dir, tmp_path,
                                                                                         monkeypatch):
    # The CPU image bakes the bundled model's conversion into FLOTILLA_CACHE_PREBUILT; pods write to FLOTILLA_CACHE.
    from flotilla.engine.model_loader import bundled_model_path, convert_gguf

    monkeypatch.setenv("FLOTILLA_CACHE", str(tmp_path / "writable"))
    monkeypatch.setenv("FLOTILLA_CACHE_PREBUILT", str(smollm2_dir.parent.parent))
    assert convert_gguf(Path(bundled_model_path())) == smollm2_dir
    assert not (tmp_path / "writable").exists()  # nothing written
