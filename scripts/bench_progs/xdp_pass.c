/* xdp_pass.c: a program that passes every frame, for the peer of a veth that runs xdpfw in
 * native mode (netns_tests/test_lb.py, scripts/bench_lb.py).
 *
 * A native XDP_TX on a veth hands the frame to the peer veth's NAPI ring, and the kernel
 * (drivers/net/veth.c: veth_xdp_flush) only schedules that NAPI when the peer has an XDP
 * program: without one the frame is dropped (no NAPI: xdp_tx_errors) or stranded in the ring
 * (NAPI from GRO alone: counted as xdp_tx, never received). This program is that XDP program.
 */
#include <uapi/linux/bpf.h>

int xdp_pass(struct xdp_md *ctx)
{
	return XDP_PASS;
}
