"""Turn bench/results/vs_llamacpp.json into the Markdown tables of docs/BENCHMARKS.md.

    .venv/bin/python bench/report.py [bench/results/vs_llamacpp.json]
"""

import json
import sys
from pathlib import Path

PAIRS = (("bf16", "F16"), ("int8", "Q8_0"), ("int4", "Q4_0"), ("int4+out", "Q4_0"))


def main():
    r = json.loads(Path(sys.argv[1] if len(sys.argv) > 1 else "bench/results/vs_llamacpp.json").read_text())
    g, l = r["chatglm3_6b"]["glmkit"], r["chatglm3_6b"]["llama.cpp"]
    bw = r.get("bandwidth_gbs", 45.0)
    print(f"ChatGLM3-6B shapes, random weights, {r['threads']} threads, {r['date']}; memory bandwidth "
          f"{bw:.1f} GB/s (1 GiB copy, read + write)\n")
    print("| glmkit | model GiB | peak RSS GiB | glmkit decode ms/token, batch 1 | llama.cpp | llama.cpp ms/token | "
          "speed ratio glmkit/llama.cpp | bandwidth floor ms | batch 8 ms/step (× batch 1) | "
          "glmkit prefill tok/s | llama.cpp prefill tok/s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for ours, theirs in PAIRS:
        if ours not in g:
            continue
        gr, lr = g[ours], l[theirs]
        b1 = next(x for x in gr["runs"] if x["batch"] == 1)
        b8 = next((x for x in gr["runs"] if x["batch"] == 8), None)
        floor = gr["model_bytes"] / (bw * 1e9) * 1000
        print(f"| {ours} | {gr['model_bytes'] / 2**30:.2f} | {gr['peak_rss_mib'] / 1024:.2f} | {b1['decode_ms_per_step']:.0f} "
              f"| {theirs} | {lr['decode_ms_per_token']:.0f} | {lr['decode_ms_per_token'] / b1['decode_ms_per_step']:.2f} "
              f"| {floor:.0f} | {b8['decode_ms_per_step']:.0f} ({b8['decode_ms_per_step'] / b1['decode_ms_per_step']:.2f}×) "
              f"| {b1['prefill_tok_s']:.1f} | {lr['prefill_tok_s']:.1f} |")
    s = r["smollm2"]
    gl = s["glmkit"]["runs"][0]
    print("\nSmolLM2-135M-Instruct (the embedded default model, Q4_1 GGUF), batch 1, 512-token prompt, 128 new tokens\n")
    print("| engine | decode tok/s | ms/token | prefill tok/s | glmkit / engine (decode speed) |")
    print("|---|---|---|---|---|")
    print(f"| glmkit (int4 g32 from Q4_1, bf16 activations) | {gl['decode_tok_s']:.1f} | {gl['decode_ms_per_step']:.1f} "
          f"| {gl['prefill_tok_s']:.0f} | 1.00 |")
    others = [("llama.cpp (Q4_1)", s["llama.cpp"])] + [(f"transformers {k.split('-', 1)[1]} eager", v)
                                                        for k, v in s.items() if k.startswith("transformers")]
    for name, v in others:
        print(f"| {name} | {v['decode_tok_s']:.1f} | {v['decode_ms_per_token']:.1f} | {v['prefill_tok_s']:.0f} "
              f"| {gl['decode_tok_s'] / v['decode_tok_s']:.2f} |")


if __name__ == "__main__":
    main()
