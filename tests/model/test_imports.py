"""The model package and the single-process engine import and run on a machine without triton."""

from __future__ import annotations

import subprocess
import sys
import textwrap

# A fresh interpreter where `import triton` fails, as on a machine where it is not installed.
SCRIPT = textwrap.dedent("""
    import sys

    class NoTriton:
        def find_spec(self, name, path=None, target=None):
            if name == "triton" or name.startswith("triton."):
                raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)")
            return None

    sys.meta_path.insert(0, NoTriton())
    try:
        import triton  # noqa: F401
    except ModuleNotFoundError:
        pass
    else:
        raise SystemExit("the blocker did not block triton")

    import torch
    import latentmoe.model
    import latentmoe.engine.engine
    from latentmoe.engine.engine import LLMEngine
    from latentmoe.engine.engine_config import EngineConfig
    from latentmoe.engine.sampling_params import SamplingParams
    from latentmoe.kernels.reference import fused_moe_ref, mla_decode_ref  # noqa: F401
    from latentmoe.model.tiny import make_tiny

    path = make_tiny(sys.argv[1], seed=0)
    engine = LLMEngine(EngineConfig(model=str(path), kernels="auto", num_blocks=16, block_size=8))
    engine.add_request([5, 6, 7], SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True))
    outputs = []
    while engine.has_unfinished:
        outputs += engine.step()
    assert len(outputs[-1].token_ids) == 3, outputs[-1]
    assert "triton" not in sys.modules, "triton got imported"
    print("OK")
""")


def test_model_and_engine_run_without_triton(tmp_path):
    result = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "tiny")], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0 and result.stdout.strip().endswith("OK"), result.stderr[-3000:]
