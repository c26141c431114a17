"""Exact top-k keep-masks: the candidates and the default per device type.

Every candidate keeps exactly k entries. ``kthvalue``, ``sort`` and ``radix`` follow one tie rule on every device:
entries above the k-th largest value, then the LOWEST-INDEX entries equal to it until exactly k are kept (NaN ranks
above everything, as in torch.topk; all NaNs tie with each other; -0.0 ties with +0.0 as they compare equal).
``topk`` is the code before issue 15, torch.topk(sorted=False), kept selectable: it keeps the same entries whenever
no tie straddles the cut, but among tied entries its choice is whatever torch's selection leaves (unspecified).
Ties at the cut are common with bf16 scores (8 mantissa bits), hence the rule.

``radix`` (issue 22) finds the k-th largest by a histogram search over order-preserving integer keys of the float
bits, 16 bits per pass (one pass for bf16/fp16, two for fp32, four for fp64), in plain tensor ops: linear work,
parallel across one huge matrix (torch.kthvalue on CUDA gives each slice one thread block), batched over equal-size
matrices with a per-row k, and no host sync anywhere (no ``.item()``, ``nonzero``, boolean indexing or bincount),
so a training step never waits for the GPU to drain. It is the default on CUDA (by design, not yet measured there)
and on CPU (measured faster from ~10^5 entries up; smaller CPU inputs take kthvalue): :data:`DEFAULT_TOPK`.
"""

from __future__ import annotations

import os

import torch

TOPK_IMPLS = ("kthvalue", "topk", "sort", "radix")
ENV_TOPK = "CAP_DS_TOPK"
# The candidate each device type gets when CAP_DS_TOPK is unset (device types not listed: DEFAULT_TOPK_OTHER, the
# default before issue 22, unmeasured there).
# cpu: radix, the fastest exact candidate measured on CPU (benchmarks/bench_masks.py --part topk --threads 1 --keeps
#   0.1 --dtypes fp32,bf16, two runs on 2 shared cores: radix / kthvalue over a BERT-base encoder layer's six
#   matrices 0.75-0.81x in fp32 and 0.44-0.47x in bf16, over a RoBERTa-large layer's 0.79-0.82x fp32 and 0.49-0.55x
#   bf16; per matrix fp32 0.58-0.90x except 768x768 at 1.23x in one run (0.58x in the other), bf16 0.38-0.63x;
#   keep 0.5 fp32 0.64-0.90x). Below SMALL_TOPK entries CPU takes kthvalue: radix's fixed cost (~0.3 ms: two
#   passes over 65,536 bins) loses there (12-4,096 entries: 0.31-0.34 ms vs 0.02-0.03 ms; 65,536: 0.84 vs 0.61 ms;
#   147,456: 1.6 vs 2.2 ms), e.g. the structured row/head masks, which are recomputed every forward.
# cuda: radix, chosen by design and NOT yet measured on a GPU: torch.kthvalue runs one thread block per slice (a
#   4.2M-entry RoBERTa-large matrix on one SM; issue 22: ~0.5 s of mask selection per step on an H200),
#   while radix does linear work spread over the whole GPU, batches equal-size layers into one call and never
#   syncs with the host.
DEFAULT_TOPK = {"cpu": "radix", "cuda": "radix"}
DEFAULT_TOPK_OTHER = "kthvalue"
SMALL_TOPK = {"cpu": 1 << 17}

# Float dtype -> the integer dtype of the same width (its keys).
_KEY_TYPES = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32,
              torch.float64: torch.int64}
RADIX_DTYPES = tuple(_KEY_TYPES)
RADIX_BITS = 16
HISTOGRAM_BINS = _BINS = 1 << RADIX_BITS  # per row and pass: batch few long rows, not many short ones


def topk_impl(device_type: str = "cpu", numel: int | None = None) -> str:
    """The top-k candidate in force on ``device_type`` (a tensor's ``device.type``) for ``numel`` entries (None:
    a large input): ``CAP_DS_TOPK`` if set, else :data:`DEFAULT_TOPK` for that device type (kthvalue below
    :data:`SMALL_TOPK`)."""
    raw = os.environ.get(ENV_TOPK, "").strip().lower()
    if not raw:
        if numel is not None and numel < SMALL_TOPK.get(device_type, 0):
            return "kthvalue"
        return DEFAULT_TOPK.get(device_type, DEFAULT_TOPK_OTHER)
    if raw not in TOPK_IMPLS:
        raise ValueError(f"{ENV_TOPK}={raw!r} is not a top-k method; allowed: {', '.join(TOPK_IMPLS)}")
    return raw


def _keep_from_kth(flat: torch.Tensor, kth: torch.Tensor, k: int, host_sync: bool | None = None) -> torch.Tensor:
    """Bool keep-mask of the k largest entries of ``flat`` given its k-th largest value (tie rule above).
    ``host_sync`` (default: on CPU) allows reading counts on the host; the other branch gives the same mask."""
    nan = flat.isnan()
    if flat.device.type == "cpu" if host_sync is None else host_sync:  # fix up only the ties, by index
        kth_nan = bool(kth.isnan())
        ge = nan if kth_nan else (flat >= kth) | nan  # NaN ranks above everything and ties only with NaN
        surplus = int(ge.sum()) - k
        if surplus == 0:  # no tie straddles the cut
            return ge
        tied = (nan if kth_nan else flat == kth).nonzero().flatten()  # drop the highest-index tied entries
        return ge.index_fill_(0, tied[tied.numel() - surplus:], False)
    # CUDA: the same rule without a host sync
    kth_nan = kth.isnan()
    above = (flat > kth) | (nan & ~kth_nan)
    tied = (flat == kth) | (nan & kth_nan)
    return above | (tied & (tied.cumsum(0) <= k - above.sum()))


def order_keys(values: torch.Tensor) -> torch.Tensor:
    """Integer keys (same width as ``values``' float dtype) whose signed order is the float order, with -0.0 and
    +0.0 on one key and every NaN (either sign, any payload) on the largest key, so equal floats tie."""
    kdt = _KEY_TYPES[values.dtype]
    bits = values.view(kdt)
    sign = bits >> (torch.iinfo(kdt).bits - 1)  # -1 where the sign bit is set, else 0
    # sign-magnitude -> two's complement: -x gets -|bits| (flip the magnitude bits, add one), so -0.0 gets 0
    return ((bits ^ (sign & torch.iinfo(kdt).max)) - sign).masked_fill_(values.isnan(), torch.iinfo(kdt).max)


def _radix_select(keys: torch.Tensor, k: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of ``keys`` [B, n] (``width``-bit key values), the k-th largest key and how many keys lie above
    it (both [B, 1]; ``k`` [B, 1] in [1, n]), by 16-bit digit histograms from the top digit down. Later passes
    clamp every key into the bin found so far, so keys outside it land in the first and last bins and are taken
    back out by count: no per-entry weights, and every step is a tensor op (no host read)."""
    b, n = keys.shape
    dev = keys.device
    # row r's bins start at r * 65536 in one flat histogram (int64 offsets where int32 would overflow)
    odt = keys.dtype if b * _BINS <= torch.iinfo(keys.dtype).max else torch.int64
    offsets = (torch.arange(b, device=dev, dtype=odt) * _BINS).unsqueeze(1) if b > 1 else 0
    hdt = torch.int32 if n <= torch.iinfo(torch.int32).max else torch.int64  # counts per row
    ones = torch.ones((), dtype=hdt, device=dev).expand(b * n)
    rank = n - k  # ascending position of the k-th largest within the current bin
    below = torch.zeros_like(k)  # keys below the current bin
    prefix = count = None  # the digits found so far (the signed value of the key's top bits); keys in that bin
    for shift in range(width - RADIX_BITS, -1, -RADIX_BITS):
        if prefix is None:  # the top digit, signed -> 0..65535
            index = (keys >> shift) + (offsets + _BINS // 2)
        else:  # the next digit within the bin found so far
            lo = prefix << (shift + RADIX_BITS)
            index = torch.clamp(keys, lo, lo + ((1 << (shift + RADIX_BITS)) - 1))
            index = ((index - lo) >> shift) + offsets if shift else index - (lo - offsets)
        hist = torch.zeros(b * _BINS, dtype=hdt, device=dev)
        hist = hist.index_add_(0, index.flatten(), ones).view(b, _BINS)
        if prefix is not None:  # the clamped keys from outside the bin
            hist[:, :1] -= below.to(hdt)
            hist[:, -1:] -= (n - below - count).to(hdt)
        cum = hist.cumsum(1, dtype=hdt)
        found = torch.searchsorted(cum, rank.to(hdt), right=True)  # the first bin whose running count passes rank
        count = hist.gather(1, found).to(torch.int64)
        lower = cum.gather(1, found).to(torch.int64) - count
        rank, below = rank - lower, below + lower
        found = found.to(keys.dtype)
        prefix = found - _BINS // 2 if prefix is None else (prefix << RADIX_BITS) | found
    return prefix, n - below - count


def topk_keep_batched(values: torch.Tensor, k: int | torch.Tensor) -> torch.Tensor:
    """Bool keep-masks [B, n] of the ``k`` largest entries of each row of ``values`` [B, n] (``k``: one int, or
    a LongTensor [B] per row, best on ``values``' device: a host-to-device copy syncs; clamped to [0, n]) by the
    radix search, with the tie rule above: the mask :func:`topk_keep` gives each row alone. No host sync."""
    if values.dim() != 2:
        raise ValueError(f"topk_keep_batched needs [B, n] values, got shape {tuple(values.shape)}")
    if values.dtype not in _KEY_TYPES:
        raise TypeError(f"radix top-k supports {', '.join(map(str, _KEY_TYPES))}; got {values.dtype}")
    b, n = values.shape
    if b == 0 or n == 0:
        return torch.zeros(b, n, dtype=torch.bool, device=values.device)
    every_row_keeps = not isinstance(k, torch.Tensor) and k > 0
    if isinstance(k, torch.Tensor):
        k = k.to(device=values.device, dtype=torch.int64).reshape(b, 1)
    else:
        k = torch.full((b, 1), int(k), dtype=torch.int64, device=values.device)
    k = k.clamp(0, n)
    keys = order_keys(values.detach().contiguous())
    width = torch.iinfo(keys.dtype).bits
    if width < 32:  # room for the digit arithmetic
        keys = keys.to(torch.int32)
    kth, above = _radix_select(keys, k.clamp_min(1), width)  # k = 0 rows: masked out below
    tied = keys == kth
    cdt = torch.int32 if n <= torch.iinfo(torch.int32).max else torch.int64
    keep = (keys > kth) | (tied & (tied.cumsum(1, dtype=cdt) <= (k - above).to(cdt)))  # lowest index first
    return keep if every_row_keeps else keep & (k > 0)


def topk_keep(flat: torch.Tensor, k: int, impl: str | None = None) -> torch.Tensor:
    """Bool mask over the 1-D ``flat`` keeping exactly ``k`` (0 < k < numel) largest entries with ``impl``
    (default: :func:`topk_impl` for ``flat``'s device type and size)."""
    n = flat.numel()
    impl = impl or topk_impl(flat.device.type, n)
    if impl == "radix" and flat.dtype in _KEY_TYPES:
        return topk_keep_batched(flat.reshape(1, n), k).reshape(n)
    if impl in ("kthvalue", "radix"):  # radix: dtypes without float keys take kthvalue (the same mask)
        return _keep_from_kth(flat, torch.kthvalue(flat, n - k + 1).values, k)
    if impl == "sort":
        idx = torch.sort(flat, descending=True, stable=True).indices[:k]
    elif impl == "topk":
        idx = torch.topk(flat, k, sorted=False).indices
    else:
        raise ValueError(f"unknown top-k method {impl!r}; allowed: {', '.join(TOPK_IMPLS)}")
    return torch.zeros(n, dtype=torch.bool, device=flat.device).index_fill_(0, idx, True)
