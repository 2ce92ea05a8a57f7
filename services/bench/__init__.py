"""The benchmark suite behind `synapse bench`: single-process baselines, the whole stack, streams, prefill,
speculation and a browser node in one run; report.md, results.json and plots."""
