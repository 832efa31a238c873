/* A deliberately broken build of the firewall for tests/test_upgrade.py and tests/test_cli.py:
 * the same maps and interface-slot marker as xdpfw.c (so only the verifier can object), and a
 * read of packet data without the check against data_end that the verifier must reject. */
#include <uapi/linux/bpf.h>
#include "xdpfw_abi.h"
#include "maps.h"

#define XDPFW_STR_(x) #x
#define XDPFW_STR(x) XDPFW_STR_(x)

int xdpfw_main(struct xdp_md *ctx)
{
	unsigned char *data = (void *)(long)ctx->data;
	__u64 slot;

	asm volatile("%0 = " XDPFW_STR(XDPFW_SLOT_MARKER) " ll" : "=r"(slot));
	return data[64 + slot] ? XDP_DROP : XDP_PASS; /* no `data + 65 > data_end` check */
}
