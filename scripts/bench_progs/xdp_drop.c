/* xdp_drop.c: the floor of any XDP program, for scripts/bench_fw.py (its calibration and flood
 * phases) and scripts/bench_lb.py.
 *
 * Returns XDP_DROP without reading the packet or touching a map: what is left is the cost of
 * entering and leaving an XDP program (BPF_PROG_TEST_RUN) or of the driver hook (flood).
 */
#include <uapi/linux/bpf.h>

int xdp_drop(struct xdp_md *ctx)
{
	return XDP_DROP;
}
