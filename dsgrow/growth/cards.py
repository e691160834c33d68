"""Method cards: what each growth operator does, what it preserves, where it comes from.

`python -m dsgrow.growth.cli grow --list-methods` (or `dsgrow grow --list-methods`) prints them.
"""
CARDS = {
    "ligo": (
        "LiGO - Wang et al., 'Learning to Grow Pretrained Models for Efficient Transformer Training', "
        "ICLR 2023. Learned linear map: width W' = B W A^T with the paper's tying (one residual map "
        "B_emb; per-layer head-unit maps for q/k/v, A_O = B_V (B_Q under GQA); per-layer MLP map with "
        "A_down = B_up), then depth mixing, one L2 x L1 matrix per module type. Only the map trains "
        "(AdamW, ~100 steps on the LM loss), then it is applied once and discarded. Inits: stack_noisy "
        "(official default, not function preserving), net2net (not function preserving), fpi "
        "(pinv tying; function preserving exactly where fpi is); depth_init takes another init's depth "
        "start (depth_init: fpi, a learned width map over FPI's depth plan); symmetry_noise (copy inits) "
        "adds FPI's zero-sum noise to the fitted model, whose copies the fit keeps equal."),
    "fpi": (
        "FPI - bert2BERT (Chen et al., ACL 2022), after Net2Net (Chen et al., ICLR 2016). New units copy "
        "old ones, readers divide by the copy count; depth by identity layers (default), stacking, "
        "interleaving or interpolation. Preserves the function exactly for MLP/head growth, residual "
        "growth by integer multiples (even copies keep norm statistics) and identity depth (post-LN "
        "BERT up to LayerNorm eps); non-integer residual growth changes only the norm statistics."),
    "aki": (
        "AKI - bert2BERT (Chen et al., ACL 2022). FPI, but new output units of layer j copy layer j+1's "
        "weights; depth by stacking (default). Breaks function preservation on purpose (symmetry "
        "breaking); the paper reports faster convergence than FPI."),
    "hyperclone": (
        "HyperCloning - Samragh et al. (Apple), 'Scaling Smart: Accelerating LLM Pre-training with Small "
        "Model Initialization', 2024. Integer-multiple width growth by tiling (W' = kron(1, W)/k_in), "
        "GQA groups kept; optional zero-sum noise across clones. Function preserving exactly (all "
        "families, with or without noise); depth by identity layers by default."),
    "stack": (
        "Depth stacking - StackBERT (Gong et al., ICML 2019: copy the whole stack on top) and G_stack "
        "(Du et al., 'Stacking Your Transformers', NeurIPS 2024: repeat the stack k times); "
        "mode='interleave' repeats each layer in place. Integer depth multiples; width by FPI copies. "
        "Not function preserving."),
    "interpolate": (
        "Depth interpolation - large layer l is the linear interpolation of the two small layers around "
        "relative depth l (L1-1)/(L2-1), the weight-space form of progressive/multi-stage stacking "
        "(MSLT, Yang et al. 2020, which also trains only the new layers for a stage; that schedule is "
        "not part of the operator). Any L2 >= L1; width by FPI copies. Not function preserving."),
    "random": (
        "From scratch - the target model with the family's own random init (Hugging Face init, "
        "initializer_range). The reference every growth method must beat; preserves nothing."),
}

# Each copy-based baseline in the form its paper recommends: copies that start as exact twins stay
# twins under Adam with dropout 0 unless the symmetry is broken (growth/symmetry.py; checked by
# tests/test_symmetry.py). Benchmarks compare LiGO with these rows; the unbroken forms are the
# methods' plain defaults, reported as labelled rows only.
PAPER_FORMS = {
    "fpi": {"noise": 0.2},         # Net2Net adds small noise (no number given): G_stack's 20%
    "aki": {"noise": 0.2},         # AKI's top layer has no layer above to mix in: noise there too
    "hyperclone": {"noise": 0.3},  # the paper's noisy variant at ~10 dB SNR: std 0.3 x std(W)
    "stack": {"noise": 0.2},       # G_stack: ~20% noise on the copy helped
    "interpolate": {"noise": 0.2},  # width by FPI copies, broken as fpi's
}
