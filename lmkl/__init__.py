"""lmkl: compare causal LMs by the exact KL divergence of their next-token distributions.

The library is usable without the CLI::

    from lmkl.specs import ComputeSpec, DataSpec, ModelSpec, OutputSpec, WindowSpec
    from lmkl.engine.token_compare import run_comparison

    outcome = run_comparison(
        ModelSpec(model="path/or/hub-id-of-reference"),
        [ModelSpec(model="path/or/hub-id-of-candidate")],
        DataSpec(source="held_out.jsonl"),
        WindowSpec(context_length=512),
        ComputeSpec(batch_size=8),
        OutputSpec(dir="runs/my-compare"),
    )
    print(outcome.results["candidates"][0]["metrics"]["kl"]["mean"])

KL(P‖Q) always means reference P, candidate Q, in nats.
"""

__version__ = "0.1.0"
