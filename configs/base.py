"""Every knob of the codebase with its default. Experiment configs start from here.

`get_config(arg)` takes the preset name after the colon in `--config=configs/x.py:tiny`.
Model size presets live in `configs/presets.py`; experiments override what they need.
"""

import ml_collections as mlc


def get_config(arg: str | None = None) -> mlc.ConfigDict:
  del arg  # presets are applied by the experiment files (configs/presets.py)
  c = mlc.ConfigDict()
  c.seed = 0  # model init and training RNG (and the data shuffle unless data.seed is set)
  c.mode = "train"  # train | eval (validation NLL) | generate (continue generate.prompt)
  c.allow_config_change = False  # resume a workdir whose saved config differs in model/data keys

  c.model = mlc.ConfigDict()
  c.model.vocab_size = -1  # -1: the tokenizer's size rounded up to vocab_multiple
  c.model.vocab_multiple = 128  # pad the embedding rows to a multiple of this
  c.model.d_model = 576  # hidden size D
  c.model.num_layers = 30  # unrolled depth L (prelude + core + coda)
  c.model.num_heads = 9  # query heads H
  c.model.num_kv_heads = 3  # key/value heads (GQA); must divide num_heads
  c.model.head_dim = -1  # -1: d_model // num_heads
  c.model.d_ff = 1536  # SwiGLU hidden size F
  c.model.rope_theta = 10_000.0  # RoPE base
  c.model.norm_eps = 1e-5  # RMSNorm epsilon
  c.model.tie_embeddings = True  # LM head shares the input embedding matrix
  c.model.init_std = 0.02  # N(0, std) init of every linear and embedding weight
  c.model.compute_dtype = "auto"  # auto (bf16 on GPU/TPU, fp32 on CPU) | float32 | bfloat16
  c.model.param_dtype = "float32"  # master weights
  c.model.attend_across_segments = False  # True: packed docs see each other (MoR code)
  c.model.attention_impl = "auto"  # auto (pallas on GPU/TPU, xla on CPU) | xla | pallas | reference
  c.model.remat = "none"  # none | block: rematerialise each block in the backward pass
  c.model.init_from = ""  # HF Llama directory or .gguf file to initialise from ("": random init)

  # Layer tying (Recursive / Relaxed Recursive Transformers, MoR §1.2). num_layers is the
  # unrolled depth L; the shared block has L/Nr layers (cycle, sequence) or (L-2)/Nr (middle-*).
  c.model.recursion = mlc.ConfigDict()
  c.model.recursion.strategy = "none"  # none | cycle | sequence | middle_cycle | middle_sequence
  c.model.recursion.num_recursions = 1  # Nr: how many times each shared layer is applied
  c.model.recursion.share_norms = True  # tie both RMSNorms with the block (False: one per depth)
  c.model.recursion.lora_rank = 0  # per-depth LoRA rank on every shared linear map (0: none)
  c.model.recursion.lora_rank_q = -1  # rank for q_proj (-1: lora_rank); capped at min(in, out)
  c.model.recursion.lora_rank_kv = -1  # rank for k_proj and v_proj (-1: lora_rank)
  c.model.recursion.lora_rank_o = -1  # rank for o_proj (-1: lora_rank)
  c.model.recursion.lora_rank_ffn = -1  # rank for gate/up/down_proj (-1: lora_rank)
  c.model.recursion.init = "stepwise"  # with init_from: stepwise | average | lower | random
  c.model.recursion.lora_init = "svd"  # with init_from: svd (of the residuals) | standard (B = 0)
  c.model.recursion.lora_merged = False  # per-loop LoRAs as one gated rank-Nr*r LoRA (cycle plans)
  c.model.recursion.early_exit = False  # an exit (final norm + head) after every loop (cycle plans)
  # decoding with early_exit: a token stops after a loop whose exit's max softmax prob >= this
  # (RRT §2.4 confidence exit; 0: every loop runs; training reads every exit, never routes)
  c.model.recursion.exit_threshold = 0.0
  c.model.recursion.stretch_init = False  # init_from: keep num_layers, spread the pretrained layers

  # Mixture-of-Recursions (docs/methods/mor.md, docs/mor.md): routers pick each token's number of
  # recursion steps. Needs recursion.strategy cycle | middle_cycle; per-depth LoRA, untied norms
  # and MoE layers in the shared block combine with it.
  c.model.mor = mlc.ConfigDict()
  c.model.mor.kind = "none"  # none | expert (top-k tokens per step) | token (top-1 depth per token)
  c.model.mor.impl = "gather"  # gather: blocks see selected tokens only | masked: full-length ref.
  c.model.mor.kv = "cache"  # cache (per-step attention) | share (recursion-1 K/V) | share_update
  c.model.mor.router = "linear"  # linear | mlp (hidden 2d) | wide_mlp (4d, paper; code's is 2d)
  c.model.mor.temp = 1.0  # routers see x / temp
  c.model.mor.z_coeff = 0.0  # router z-loss weight (paper: 0 for expert, 1e-5 for token choice)
  c.model.mor.capacity = ()  # expert: c_r per step, non-increasing in (0, 1]; (): (Nr-r+1)/Nr
  c.model.mor.expert = mlc.ConfigDict()
  c.model.mor.expert.func = "sigmoid"  # gate g = alpha * func(s): sigmoid | tanh | none (g = s)
  c.model.mor.expert.alpha = 0.1  # gate scale
  c.model.mor.expert.gating = "weighted"  # weighted: H[S] += g f(H[S]) | additive: += f(H[S])
  c.model.mor.expert.route = "topk"  # topk (sees the future) | threshold: sigma(s)>0.5 (masked)
  c.model.mor.expert.sampling = "aux_loss"  # aux_loss: BCE on the router | aux_router (detached)
  c.model.mor.expert.aux_coeff = 0.001  # BCE weight; the authors' effective one is x GA=16
  c.model.mor.expert.aux_router_lr_mult = 10.0  # aux_router: learning-rate multiple (paper 10x)
  c.model.mor.expert.cap_warmup_steps = 0  # optimizer steps of cosine capacity decay from 1
  c.model.mor.token = mlc.ConfigDict()
  c.model.mor.token.func = "softmax"  # p = alpha * func(router logits): softmax | sigmoid
  c.model.mor.token.alpha = 1.0  # probability scale
  c.model.mor.token.gate = "exit"  # exit: gate at the exit step (code) | every (paper Eq. 2.2)
  c.model.mor.token.balancing = "loss"  # loss | loss_free (bias, updated per step) | none
  c.model.mor.token.bal_coeff = 0.1  # balancing-loss weight
  c.model.mor.token.bias_rate = 0.001  # loss_free: u, the bias change per optimizer step
  c.model.mor.token.bal_warmup_steps = 0  # optimizer steps with every token at depth Nr, bias 0
  c.model.mor.token.capacity_factor = 0.0  # >0: slots per step f*T*(Nr-r+1)/Nr, overflow exits
  c.model.mor.token.exact_buckets = 8  # f = 0: step r runs in the smallest of n static sizes

  # Routed Mixture-of-Experts in the FFN slot (docs/moe.md): token choice over E SwiGLU experts.
  c.model.moe = mlc.ConfigDict()
  c.model.moe.num_experts = 0  # routed experts E (0: the dense SwiGLU FFN in every layer)
  c.model.moe.top_k = 2  # experts per token k, 1 <= k <= E
  c.model.moe.d_ff = -1  # hidden size of one expert (-1: model.d_ff)
  c.model.moe.num_shared_experts = 0  # always-on experts (DeepSeekMoE), one SwiGLU of n * d_ff
  c.model.moe.score = "softmax"  # router scores: softmax (Switch, Mixtral) | sigmoid (DeepSeek-V3)
  c.model.moe.renormalize = True  # divide the top-k weights by their sum (Mixtral, DeepSeek-V3)
  c.model.moe.capacity_factor = 0.0  # 0: dropless; f > 0: ceil(T k / E) f slots/expert/row, drop
  c.model.moe.balance_coeff = 0.01  # Switch load-balancing loss E sum_e f_e P_e (1 when balanced)
  c.model.moe.balance_scope = "batch"  # batch (Switch) | sequence (per-row mean: DeepSeek seq_aux)
  c.model.moe.balance_form = "switch"  # switch (per layer, mean) | mixtral (all layers pooled, HF)
  c.model.moe.z_coeff = 0.0  # router z-loss mean(logsumexp(logits)^2) weight (ST-MoE: 1e-3)
  c.model.moe.first_dense = 0  # the first layers keep the dense FFN (DeepSeek first_k_dense)
  c.model.moe.every = 1  # routed FFN where (layer + 1) % every == 0 (1: every layer)
  c.model.moe.impl = "ragged"  # ragged (sort + grouped matmuls) | dense (all experts, reference)
  c.model.moe.gmm = "auto"  # auto (tiled on CPU, else xla) | xla | pallas | tiled | reference
  # linear x W_r | gru: RMoE, h_i = GRU(x_i Proj_i, h_{i-1}) G_i | mlp: GELU(x W1) W2 (SMoE-MLP)
  c.model.moe.router = "linear"
  c.model.moe.gru_dim = 128  # gru: GRU hidden size p (RMoE recommends 128)
  c.model.moe.router_mlp_dim = -1  # mlp: hidden width m (-1: 2 * gru_dim, RMoE Tab. 1's 256)
  c.model.moe.gru_recurrence = "full"  # gru: full | detach (stop grad of h_{i-1}) | none (h = 0)
  c.model.moe.rex_group = 1  # ReXMoE r: groups of r adjacent MoE layers route over r E experts
  c.model.moe.psr = False  # ReXMoE Progressive Scaling Routing: routable pool N -> r N (Eq. 6)
  c.model.moe.psr_start = 0  # PSR t_s: only N_0 candidates (the layer's own E) up to this step
  c.model.moe.psr_end = 1000  # PSR t_e: all r E experts routable from this step
  c.model.moe.psr_schedule = "linear"  # PSR N_t: linear (Eq. 6) | stepwise (r - 1 jumps, Tab. 5)
  c.model.moe.psr_start_experts = -1  # PSR N_0 up to t_s (-1: E); < E allows PSR at rex_group=1
  # Chain-of-Experts (docs/methods/rrt_coe_rmoe_rexmoe.md §2; docs/moe.md): the routed FFN run
  # `iterations` times over the same experts, one router per iteration, top_k per iteration.
  c.model.moe.iterations = 1  # C (1: plain MoE)
  c.model.moe.coe_residual = "outer"  # outer: block residual only | inner (CoE code) | inner_outer
  c.model.moe.coe_shared_router = False  # one router for every iteration (code use_igate=False)

  c.data = mlc.ConfigDict()
  c.data.source = "embedded"  # embedded | jsonl | parquet | arrayrecord
  c.data.train_files = ""  # glob of training files for jsonl/parquet/arrayrecord
  c.data.valid_files = ""  # glob of validation files (empty: hold out valid_fraction of train docs)
  c.data.text_key = "text"  # field holding the document text in jsonl/parquet records
  c.data.valid_fraction = 0.05  # held-out docs when valid_files is empty
  c.data.split_seed = 1234  # fixed seed of the document-level train/validation split
  c.data.seq_len = 256  # tokens per training row T (packed)
  c.data.tokenizer = "bpe"  # bpe (train on the train split) | path/tokenizer.json
  c.data.bpe_vocab_size = 8192  # vocabulary size of the trained BPE
  c.data.cache_dir = ""  # corpus manifest + tokenizers ("": <workdir>/cache)
  c.data.num_threads = 2  # grain read threads
  c.data.prefetch = 8  # grain prefetch buffer (batches)
  c.data.worker_count = 0  # grain multiprocessing workers (0: in-process)
  c.data.seed = -1  # seed of the training-document shuffle only (-1: follow config.seed)
  c.data.shuffle_window = 1024  # training rows shuffled in windows of this many rows (0: off)
  c.data.positions = "document"  # document: restart at 0 at each document | row: 0..T-1 (MoR code)
  c.data.score_boundary_targets = False  # True: score the target across a document boundary too
  c.data.row_length = "T+1"  # tokens packed per row: T+1 (T targets) | T (MoR code: T-1 targets)
  c.data.skip_bad_records = False  # skip (and count) unreadable records instead of failing

  c.train = mlc.ConfigDict()
  c.train.steps = 1000  # optimizer steps (ignored when flop_budget > 0)
  c.train.flop_budget = 0.0  # >0: total FLOPs; steps = budget / FLOPs per step
  c.train.batch_size = 32  # global batch in sequences per optimizer step
  c.train.grad_accum = 1  # micro-batches per step (batch_size must divide by it)
  c.train.lr = 3e-3  # peak learning rate
  c.train.schedule = "wsd"  # wsd (warmup-stable-decay) | cosine | constant
  c.train.warmup_fraction = 0.05  # fraction of steps of linear warm-up (used when warmup_steps < 0)
  c.train.warmup_steps = -1  # explicit warm-up steps (-1: use warmup_fraction)
  c.train.decay_fraction = 0.2  # wsd: fraction of steps of the final linear decay
  c.train.min_lr_ratio = 0.0  # final lr as a fraction of peak (wsd and cosine)
  c.train.b1 = 0.9  # AdamW beta1
  c.train.b2 = 0.95  # AdamW beta2
  c.train.eps = 1e-8  # AdamW epsilon
  c.train.weight_decay = 0.1  # decoupled weight decay (norm scales and biases excluded)
  c.train.grad_clip = 1.0  # global-norm clipping (0: off)
  c.train.log_every = 10  # steps between metric lines (metrics.jsonl, wandb, progress bar)
  c.train.eval_every = 200  # steps between validation passes (0: only at the end)
  c.train.eval_batches = 8  # validation batches per pass (fixed, same every time; -1: whole split)
  c.train.nonfinite = "stop"  # stop (checkpoint last good state) | skip (drop update)
  c.train.max_skipped = 10  # with nonfinite=skip: stop after this many consecutive skipped steps
  c.train.exit_loss = "final"  # with early_exit: final | weighted (e / sum j) | aggressive (RRT)
  c.train.exit_coeff = 0.1  # aggressive: CE weight c of every intermediate exit
  c.train.exit_kd_coeff = 0.1  # aggressive: weight of KL(stop_grad(p_final) || p_exit) per exit
  c.train.distill = mlc.ConfigDict()  # forward-KL distillation from a frozen teacher (RRT App. I)
  c.train.distill.coeff = 0.0  # lambda of KL(p_teacher || p_student) added to the loss (0: off)
  c.train.distill.teacher = ""  # HF Llama dir or .gguf ("": config.model.init_from, untied)
  c.train.progress = True  # show a progress bar on process 0
  c.train.start_over = False  # a workdir whose checkpoints are gone: train again from step 0

  c.checkpoint = mlc.ConfigDict()
  c.checkpoint.every = 100  # steps between checkpoints (0: only at the end and on signals)
  c.checkpoint.keep = 3  # checkpoints kept
  c.checkpoint.async_save = True  # write checkpoints in the background
  c.checkpoint.restore_from = ""  # a checkpoint step dir to start from

  c.generate = mlc.ConfigDict()  # mode=generate: KV-cached decoding (docs/inference.md)
  c.generate.prompt = "ROMEO:"  # text to continue (tokenized without an end-of-document token)
  c.generate.num_tokens = 32  # tokens generated after the prompt
  c.generate.temperature = 0.8  # 0: greedy (argmax; small models tend to repeat one token)
  c.generate.top_p = 0.95  # sample from the likeliest tokens holding this much mass (1: all)
  c.generate.seed = 0  # sampling key jax.random.key(seed) (unused when greedy)
  c.generate.num_samples = 1  # continuations of the prompt, decoded as one batch
  c.generate.prompts_file = ""  # serve one prompt per line through the engine (replaces prompt)
  c.generate.slots = 8  # prompts_file: requests decoded at once (cache rows of the engine)
  c.generate.max_len = 256  # prompts_file: cache entries per slot (prompt + num_tokens must fit)
  c.generate.engine = "sequence"  # prompts_file: sequence (any model) | depthwise (MoR, expert)
  # recursive models trained with early_exit: serve with this confidence threshold (RRT §2.4;
  # -1: the run's model.recursion.exit_threshold, 0: every loop)
  c.generate.exit_threshold = -1.0
  c.generate.block_rows = 0  # engine=depthwise: rows of the shared-block batch per step (0: slots)

  c.wandb = mlc.ConfigDict()
  c.wandb.mode = "offline"  # offline | online | disabled
  c.wandb.project = "recursive-transformers"
  c.wandb.entity = ""
  c.wandb.group = ""  # sweeps set this to the sweep name
  c.wandb.tags = ""  # comma-separated
  c.wandb.name = ""  # run name ("" -> workdir basename)

  c.mesh = mlc.ConfigDict()
  c.mesh.data = -1  # data-parallel axis size (-1: whatever devices are left)
  c.mesh.fsdp = 1  # parameter/optimizer-state sharding axis
  c.mesh.tensor = 1  # tensor-parallel axis (heads, d_ff, vocab)
  c.mesh.expert = 1  # expert-parallel axis: MoE experts sharded, tokens all-to-all (docs/moe.md)

  c.distributed = mlc.ConfigDict()
  c.distributed.enabled = "auto"  # auto (SLURM / TPU pod / coordinator flag) | yes | no
  c.distributed.coordinator_address = ""  # host:port of process 0
  c.distributed.num_processes = -1
  c.distributed.process_id = -1
  return c
