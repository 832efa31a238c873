/* xdp_tx.c: the floor of a load balancer's XDP_TX path, for scripts/bench_lb.py.
 *
 * Swaps nothing and reads nothing: returns XDP_TX, the cost of entering and leaving an XDP
 * program that bounces the frame (BPF_PROG_TEST_RUN).
 */
#include <uapi/linux/bpf.h>

int xdp_tx(struct xdp_md *ctx)
{
	return XDP_TX;
}
