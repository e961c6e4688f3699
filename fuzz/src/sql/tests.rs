//! Tests of the renderer over random inputs.

use super::*;

/// Random inputs render without panicking, and stay within about twice the size cap.
#[test]
fn random_inputs_render() {
    let mut state = 0x2545_f491_4f6c_dd1du64;
    for len in 0..2000usize {
        let bytes: Vec<u8> = (0..len * 7 % 4096)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state as u8
            })
            .collect();
        let sql = render_bytes(&bytes);
        // Soft: a clause rendered whole and then inserted may pass the cap once more.
        assert!(sql.len() <= 2 * MAX_SQL + 300_000, "{}", sql.len());
    }
}
