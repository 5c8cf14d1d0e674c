"""Where does test_gpu_models' gpt2-jetfire fp32-twin test spend > 240 s? (session 6)

Runs the test's model and batch (GPT-2 small width, 2 layers, 8 x 512 tokens) in each mode given, forward then
backward, timing each; ``CUDA_LAUNCH_BLOCKING=1`` so a kernel that never ends blocks its launch in Python, and a
faulthandler dump of every thread after ``--dump-after`` seconds names the frame.
"""
import argparse
import faulthandler
import os
import sys
import time

os.environ.setdefault("CUDA_LAUNCH_BLOCKING", "1")
import torch  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
from int8flow.models import GPTConfig, LlamaConfig, build_model  # noqa: E402

CONFIGS = {
    "gpt2": GPTConfig(block_size=512, vocab_size=50304, n_layer=2, n_head=12, n_embd=768),
    "llama": LlamaConfig(vocab_size=32000, dim=512, n_layers=2, n_heads=8, n_kv_heads=8, ffn_dim=1376, max_seq_len=512),
}

p = argparse.ArgumentParser()
p.add_argument("--runs", default="gpt2:jetfire-linear,llama:jetfire,gpt2:jetfire")
p.add_argument("--dump-after", type=float, default=100)
a = p.parse_args()
faulthandler.dump_traceback_later(a.dump_after, exit=True)
for run in a.runs.split(","):
    arch, mode = run.split(":")
    cfg = CONFIGS[arch]
    torch.manual_seed(0)
    model = build_model(cfg, mode).cuda()
    g = torch.Generator(device="cuda").manual_seed(1)
    idx = torch.randint(0, cfg.vocab_size, (8, 513), generator=g, device="cuda")
    for it in range(2):
        t0 = time.time()
        _, loss = model(idx[:, :-1], idx[:, 1:])
        torch.cuda.synchronize()
        t1 = time.time()
        print(f"{arch:6s} {mode:16s} iter {it} forward {t1 - t0:7.2f} s", flush=True)
        loss.backward()
        torch.cuda.synchronize()
        print(f"{arch:6s} {mode:16s} iter {it} backward {time.time() - t1:7.2f} s loss {loss.item():.4f}", flush=True)
faulthandler.cancel_dump_traceback_later()
