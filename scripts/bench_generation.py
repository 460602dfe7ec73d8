"""Generation speed for the corpus build: the HF twin's batched ``generate`` (what `saefeatures corpus
build` runs) at several batch sizes, against llama.cpp running the same GGUF file through its
Python bindings, side by side in one run, and whether llama.cpp reproduces the model.

The prompts are the build's own (recipe prefill: the chat-formatted request with the reply started
for the model), one per emotion. Every row generates exactly ``--new-tokens`` tokens per prompt
(end-of-text suppressed) with the build's sampling (temperature 0.8, top-p 0.95, repetition
penalty 1.1) and counts generated tokens per second of wall time, prompt processing included.
Fidelity: greedy continuations of the same prompts by both, compared token by token (identical
continuations, and the mean length of the common prefix).

llama.cpp is optional (``pip install llama-cpp-python``: PyPI has only its source, which compiles
llama.cpp; its rows are skipped without it).

    OMP_NUM_THREADS=2 python scripts/bench_generation.py [--batches 1 8 16 32 64] [--new-tokens 128]
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from saefeatures.corpus_build import CorpusConfig, plan_corpus
from saefeatures.generation import GenerationConfig, Generator, sampling_kwargs
from saefeatures.model_cache import embedded_model_file
from saefeatures.models import hf_twin, load_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 16, 32, 64])
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--min-prompts", type=int, default=8, help="prompts per row at least (batch 1: this many)")
    ap.add_argument("--greedy-prompts", type=int, default=16)
    ap.add_argument("--greedy-tokens", type=int, default=48)
    args = ap.parse_args()

    model = load_model()
    hf, tok = hf_twin(model).float().eval(), model.tokenizer
    gen = Generator(hf, tok, GenerationConfig())
    plan = [b.items[0] for b in plan_corpus(CorpusConfig()) if b.emotion not in ("neutral", "general")]
    prompts = [gen.render(p.prompt, p.prefill) for p in plan][: max(max(args.batches), args.min_prompts,
                                                                      args.greedy_prompts)]
    threads = torch.get_num_threads()
    print(f"# {platform.machine()} {platform.processor() or ''}, torch threads {threads}; {args.new_tokens} new "
          f"tokens per prompt; HF twin in float32")
    print(f"{'backend':>24} {'batch':>5} {'prompts':>7} {'tokens/s':>9} {'x HF batch 1':>12}")
    rates = {}
    for b in args.batches:
        n = max(b, args.min_prompts)
        rate = hf_rate(hf, tok, prompts[:n], b, args.new_tokens)
        rates[("hf", b)] = rate
        print(f"{'transformers generate':>24} {b:5d} {n:7d} {rate:9.1f} {rate / rates[('hf', args.batches[0])]:12.2f}",
              flush=True)
    try:
        from llama_cpp import Llama
    except ImportError:
        print("# llama-cpp-python is not installed: no llama.cpp rows (pip install llama-cpp-python)")
        return
    llm = Llama(model_path=str(embedded_model_file()), n_ctx=1024, n_threads=threads, n_batch=512, seed=0,
                verbose=False)
    n = args.min_prompts
    rate = llama_rate(llm, tok, prompts[:n], args.new_tokens)
    print(f"{'llama.cpp (GGUF, Q4_1)':>24} {1:5d} {n:7d} {rate:9.1f} {rate / rates[('hf', args.batches[0])]:12.2f}")
    best = max(rates, key=rates.get)
    print(f"# llama.cpp / best HF (batch {best[1]}): {rate / rates[best]:.2f}x")
    same, common = greedy_agreement(hf, tok, llm, prompts[: args.greedy_prompts], args.greedy_tokens)
    print(f"# greedy, {args.greedy_prompts} prompts x {args.greedy_tokens} tokens: {same} identical continuations; "
          f"common prefix {common:.1f} tokens on average")


def hf_rate(hf, tok, prompts: list[str], batch: int, new_tokens: int) -> float:
    """Generated tokens per second with transformers' ``generate`` at ``batch`` prompts per call."""
    side, tok.padding_side = tok.padding_side, "left"
    try:
        encs = [tok(prompts[i:i + batch], return_tensors="pt", padding=True, add_special_tokens=False)
                for i in range(0, len(prompts), batch)]
    finally:
        tok.padding_side = side
    torch.manual_seed(0)
    start = time.perf_counter()
    with torch.inference_mode():
        for enc in encs:
            hf.generate(**enc, max_new_tokens=new_tokens, min_new_tokens=new_tokens, repetition_penalty=1.1,
                        pad_token_id=tok.pad_token_id, **sampling_kwargs(0.8, 0.95))
    return len(prompts) * new_tokens / (time.perf_counter() - start)


def llama_rate(llm, tok, prompts: list[str], new_tokens: int) -> float:
    """Generated tokens per second with llama.cpp, one prompt at a time (its Python API's unit)."""
    eos = tok.eos_token_id
    start = time.perf_counter()
    made = 0
    for i, text in enumerate(prompts):
        ids = tok(text, add_special_tokens=False).input_ids
        out = llm.create_completion(ids, max_tokens=new_tokens, temperature=0.8, top_p=0.95, top_k=0, min_p=0.0,
                                    repeat_penalty=1.1, logit_bias={eos: -1e9}, seed=i)
        made += out["usage"]["completion_tokens"]
    return made / (time.perf_counter() - start)


def greedy_agreement(hf, tok, llm, prompts: list[str], new_tokens: int) -> tuple[int, float]:
    """(identical greedy continuations, mean common-prefix length) of the HF twin and llama.cpp."""
    same, common = 0, 0
    for text in prompts:
        enc = tok(text, return_tensors="pt", add_special_tokens=False)
        with torch.inference_mode():
            ref = hf.generate(**enc, max_new_tokens=new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
        ref = ref[0, enc.input_ids.shape[1]:].tolist()
        llm.reset()
        got = []
        for t in llm.generate(enc.input_ids[0].tolist(), temp=0.0, top_k=1, min_p=0.0, repeat_penalty=1.0, reset=True):
            got.append(int(t))
            if len(got) == len(ref) or t == tok.eos_token_id:
                break
        k = next((i for i, (a, b) in enumerate(zip(ref, got)) if a != b), min(len(ref), len(got)))
        same += int(ref == got)
        common += k
    return same, common / len(prompts)


if __name__ == "__main__":
    main()
