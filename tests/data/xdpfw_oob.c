/* A deliberately broken build of the firewall for tests/test_upgrade.py: it compiles, but reads
 * packet data without checking it against data_end, which the verifier must reject. */
#include <uapi/linux/bpf.h>

int xdpfw_main(struct xdp_md *ctx)
{
	unsigned char *data = (void *)(long)ctx->data;

	return data[64] ? XDP_DROP : XDP_PASS; /* no `data + 65 > data_end` check */
}
