/* hash.h: Bob Jenkins' lookup3 hash (the kernel's include/linux/jhash.h), for flow hashing.
 *
 * BCC ships no jhash (and the kernel header it drags in is not ours to rely on: hence the
 * xdpfw_ prefix). Only the data plane computes it, so it only has to be stable within
 * the kernel: the control plane never needs the same numbers.
 */
#ifndef XDPFW_HASH_H
#define XDPFW_HASH_H

#define XDPFW_JHASH_INITVAL 0xdeadbeef

static __always_inline __u32 xdpfw_rol32(__u32 word, unsigned int shift)
{
	return (word << shift) | (word >> ((-shift) & 31));
}

#define xdpfw_jhash_mix(a, b, c)                \
	{                                   \
		a -= c; a ^= xdpfw_rol32(c, 4);  c += b; \
		b -= a; b ^= xdpfw_rol32(a, 6);  a += c; \
		c -= b; c ^= xdpfw_rol32(b, 8);  b += a; \
		a -= c; a ^= xdpfw_rol32(c, 16); c += b; \
		b -= a; b ^= xdpfw_rol32(a, 19); a += c; \
		c -= b; c ^= xdpfw_rol32(b, 4);  b += a; \
	}

#define xdpfw_jhash_final(a, b, c)                \
	{                                     \
		c ^= b; c -= xdpfw_rol32(b, 14);    \
		a ^= c; a -= xdpfw_rol32(c, 11);    \
		b ^= a; b -= xdpfw_rol32(a, 25);    \
		c ^= b; c -= xdpfw_rol32(b, 16);    \
		a ^= c; a -= xdpfw_rol32(c, 4);     \
		b ^= a; b -= xdpfw_rol32(a, 14);    \
		c ^= b; c -= xdpfw_rol32(b, 24);    \
	}

/* Three 32-bit words (an IPv4 flow: saddr, daddr, ports). */
static __always_inline __u32 xdpfw_jhash_3words(__u32 a, __u32 b, __u32 c, __u32 initval)
{
	a += XDPFW_JHASH_INITVAL + initval;
	b += XDPFW_JHASH_INITVAL + initval;
	c += XDPFW_JHASH_INITVAL + initval;
	xdpfw_jhash_final(a, b, c);
	return c;
}

/* jhash2 over a fixed number of 32-bit words (unrolled: `len` must be a constant). */
static __always_inline __u32 xdpfw_jhash2(const __u32 *k, const __u32 len, __u32 initval)
{
	__u32 a, b, c;
	__u32 n = len;

	a = b = c = XDPFW_JHASH_INITVAL + (len << 2) + initval;
#pragma unroll
	for (int i = 0; i < 8; i++) { /* up to 8 * 3 words; our longest key is 9 */
		if (n <= 3)
			break;
		a += k[0];
		b += k[1];
		c += k[2];
		xdpfw_jhash_mix(a, b, c);
		k += 3;
		n -= 3;
	}
	switch (n) {
	case 3:
		c += k[2];
		/* fallthrough */
	case 2:
		b += k[1];
		/* fallthrough */
	case 1:
		a += k[0];
		xdpfw_jhash_final(a, b, c);
		break;
	case 0:
		break;
	}
	return c;
}

#endif /* XDPFW_HASH_H */
