"""Serving from a `jax.export` folder: same greedy tokens as the engine, no model code loaded."""
import json
import subprocess
import sys

import pytest
from serve_tiny import CFG, TOK, tiny_engine, tiny_params

from jaxcourse.errors import UserError
from jaxcourse.serve import __main__ as serve_main
from jaxcourse.serve import export
from jaxcourse.serve.engine import Request, SamplingParams

PROMPTS = [[1, 2, 3], list(range(5, 25)), [7] * 9]

SERVE_FROM_EXPORT = """
import json, sys
from jaxcourse.serve.engine import Request, SamplingParams
from jaxcourse.serve.export import load_exported
eng, tok = load_exported(sys.argv[1])
out = eng.complete([Request(p, SamplingParams(max_tokens=8, temperature=0.0))
                    for p in json.loads(sys.argv[2])])
loaded = sorted(m for m in sys.modules if m.startswith(("jaxcourse.models", "jaxcourse.lm")))
print(json.dumps({"tokens": [r["tokens"] for r in out], "model_modules": loaded,
                  "vocab": tok.vocab_size, "compiled_after_warmup": eng.compilations()}))
"""


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    eng = tiny_engine(tiny_params())
    d = tmp_path_factory.mktemp("export")
    export.export_engine(eng, TOK, d)
    greedy = eng.complete([Request(p, SamplingParams(max_tokens=8, temperature=0.0))
                           for p in PROMPTS])
    return d, [r["tokens"] for r in greedy]


def test_fresh_process_serves_the_export_without_model_code(exported):
    d, want = exported
    man = json.loads((d / "manifest.json").read_text())
    assert man["engine"]["buckets"] == [8, 32] and man["model"]["context"] == CFG.context
    # a prefill per (bucket, batch of 1 or 3 prompts), a decode chunk per (rows 1 or 3,
    # view width of 2 or 8 blocks)
    assert sorted(man["functions"]) == ["decode_1x2", "decode_1x8", "decode_3x2", "decode_3x8",
                                        "prefill_32x1", "prefill_32x3", "prefill_8x1",
                                        "prefill_8x3"]
    run = subprocess.run([sys.executable, "-c", SERVE_FROM_EXPORT, str(d), json.dumps(PROMPTS)],
                         capture_output=True, text=True, timeout=120, check=True)
    got = json.loads(run.stdout.strip().splitlines()[-1])
    assert got["model_modules"] == []
    assert got["tokens"] == want and got["vocab"] == TOK.vocab_size
    assert got["compiled_after_warmup"] == 0  # the exported steps, not the model's jits


def test_missing_or_corrupt_export_is_one_line(exported, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        serve_main.main(["--from-export", str(tmp_path / "nowhere"), "--no-cache"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 1 and "manifest.json missing" in err and "\n" not in err
    d, _ = exported
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in d.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    (bad / "decode_3x8.jaxexp").write_bytes(b"not a flatbuffer")
    with pytest.raises(UserError, match="decode_3x8.jaxexp: not a jax.export"):
        export.load_exported(bad)
    (bad / "manifest.json").write_text("{")
    with pytest.raises(UserError, match="not a readable serve export"):
        export.load_exported(bad)
