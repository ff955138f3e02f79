//! The gated MLP: `down(ffn_sub_norm(relu(gate(h))^2 * up(h)))`.

use bitnet_cpu::TernaryMatrix;

pub struct Mlp {
    /// fused gate|up `[2 * intermediate][hidden]`
    pub gate_up: TernaryMatrix,
    /// `[hidden][intermediate]`
    pub down: TernaryMatrix,
    /// `[intermediate]`
    pub sub_norm: Vec<f32>,
}

/// `mid = relu(gate)^2 * up` for one token; `gate_up` is the fused row `[gate | up]`.
#[inline]
pub fn relu2_mul(gate_up: &[f32], mid: &mut [f32]) {
    let n = mid.len();
    let (g, u) = gate_up.split_at(n);
    for ((m, &g), &u) in mid.iter_mut().zip(g).zip(u) {
        let r = g.max(0.0);
        *m = (r * r) * u;
    }
}
