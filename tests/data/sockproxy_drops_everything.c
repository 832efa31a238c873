/* A sockproxy that loads and attaches but never forwards anything, for
 * tests/test_sockproxy_selftest.py: the verdict drops every skb, so a spliced connection goes
 * silent, which the self-test must catch. */
#include "sockproxy_maps.h"

int sp_parser(struct __sk_buff *skb)
{
	return skb->len;
}

int sp_verdict(struct __sk_buff *skb)
{
	return SK_DROP;
}
