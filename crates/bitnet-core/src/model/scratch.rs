//! Every activation buffer of a forward step, allocated once for the largest step (`max_tokens`
//! tokens, `max_logit_rows` logit rows, `max_ctx` attended positions) and reused: a warmed-up
//! decode step allocates nothing.

use bitnet_cpu::attn::AttnOps;
use bitnet_cpu::QuantActs;

use crate::config::ModelConfig;

pub struct Scratch {
    pub(crate) max_tokens: usize,
    pub(crate) max_logit_rows: usize,
    /// residual stream `[n][hidden]`
    pub(crate) x: Vec<f32>,
    /// one normed row per token, `[n][max(hidden, q_dim, intermediate)]`
    pub(crate) normed: Vec<f32>,
    /// int8 activations for BitLinears whose input is `hidden` / `q_dim` / `intermediate` wide
    pub(crate) acts_h: QuantActs,
    pub(crate) acts_q: QuantActs,
    pub(crate) acts_i: QuantActs,
    /// fused q|k|v output `[n][q_dim + 2 kv_dim]`
    pub(crate) qkv: Vec<f32>,
    /// attention output `[n][q_dim]`
    pub(crate) attn: Vec<f32>,
    /// fused gate|up output `[n][2 * intermediate]`
    pub(crate) gate_up: Vec<f32>,
    /// relu(gate)^2 * up `[n][intermediate]`
    pub(crate) mlp_mid: Vec<f32>,
    /// o_proj / down_proj output `[n][hidden]`
    pub(crate) proj_out: Vec<f32>,
    /// softmax scores: per pool thread, one row of `attention::score_stride(max_ctx)` per query
    /// row of an attention item; then as many again, each thread's block for the group whose
    /// scores it hands to the next thread
    pub(crate) scores: Vec<f32>,
    /// per pool thread: its handoff block is ready (`attention::attend`)
    pub(crate) handoff: Vec<std::sync::atomic::AtomicBool>,
    /// the attention primitives of the model's kernel level
    pub(crate) attn_ops: AttnOps,
    /// per pool thread, the query rows of one attention item
    pub(crate) q_rows: Vec<super::attention::QRow>,
    pub(crate) max_ctx: usize,
    /// per token of the step: its position and its chunk index
    pub(crate) tok_pos: Vec<usize>,
    pub(crate) tok_chunk: Vec<usize>,
    /// tokens whose logits are computed, in output order
    pub(crate) logit_tokens: Vec<usize>,
    /// final-normed rows of those tokens `[rows][hidden]`
    pub(crate) final_normed: Vec<f32>,
    /// the same rows quantized to int8 (int8 x int8 LM head)
    pub(crate) head_acts: QuantActs,
    /// the rescoring pass of a quantized head
    pub(crate) head_rescore: super::lm_head::RescoreBufs,
    /// logits `[rows][vocab]`
    pub(crate) logits: Vec<f32>,
    pub(crate) vocab: usize,
}

impl Scratch {
    pub fn new(
        cfg: &ModelConfig,
        max_tokens: usize,
        max_logit_rows: usize,
        max_ctx: usize,
        n_threads: usize,
        attn_ops: AttnOps,
        head_rescore: usize,
    ) -> Scratch {
        let n = max_tokens.max(1);
        let r = max_logit_rows.max(1);
        let wide = cfg.hidden_size.max(cfg.q_dim).max(cfg.intermediate_size);
        Scratch {
            max_tokens: n,
            max_logit_rows: r,
            x: vec![0.0; n * cfg.hidden_size],
            normed: vec![0.0; n * wide],
            acts_h: QuantActs::new(n, cfg.hidden_size),
            acts_q: QuantActs::new(n, cfg.q_dim),
            acts_i: QuantActs::new(n, cfg.intermediate_size),
            qkv: vec![0.0; n * (cfg.q_dim + 2 * cfg.kv_dim)],
            attn: vec![0.0; n * cfg.q_dim],
            gate_up: vec![0.0; n * 2 * cfg.intermediate_size],
            mlp_mid: vec![0.0; n * cfg.intermediate_size],
            proj_out: vec![0.0; n * cfg.hidden_size],
            scores: vec![
                0.0;
                2 * n_threads.max(1)
                    * super::attention::score_rows(cfg)
                    * super::attention::score_stride(max_ctx)
            ],
            handoff: (0..n_threads.max(1)).map(|_| Default::default()).collect(),
            attn_ops,
            q_rows: vec![Default::default(); n_threads.max(1) * super::attention::score_rows(cfg)],
            max_ctx: max_ctx.max(1),
            tok_pos: Vec::with_capacity(n),
            tok_chunk: Vec::with_capacity(n),
            logit_tokens: Vec::with_capacity(n.max(r)),
            final_normed: vec![0.0; r * cfg.hidden_size],
            head_acts: QuantActs::new(r, cfg.hidden_size),
            head_rescore: super::lm_head::RescoreBufs::new(head_rescore, r, n_threads),
            logits: vec![0.0; r * cfg.vocab_size],
            vocab: cfg.vocab_size,
        }
    }

    /// Largest number of tokens one step can take.
    pub fn max_tokens(&self) -> usize {
        self.max_tokens
    }
    /// Largest number of logit rows one step can produce.
    pub fn max_logit_rows(&self) -> usize {
        self.max_logit_rows
    }
    /// Logits of output row `i` of the last step.
    pub fn logits(&self, i: usize) -> &[f32] {
        &self.logits[i * self.vocab..(i + 1) * self.vocab]
    }
    /// Mutable logits row (samplers may modify in place).
    pub fn logits_mut(&mut self, i: usize) -> &mut [f32] {
        &mut self.logits[i * self.vocab..(i + 1) * self.vocab]
    }
}
