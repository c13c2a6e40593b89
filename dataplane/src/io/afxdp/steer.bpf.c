// SPDX-License-Identifier: Apache-2.0
// meshplane's XDP steering programs, compiled by clang at build time
// (dataplane/build.rs) and attached one per interface by io::afxdp.
//
// steer_uplink: on the data-path NIC, only dataplane traffic goes to the
//   AF_XDP socket of the receiving queue: UDP to the VXLAN port on the
//   data-path address, TCP/UDP to an (address, port, protocol) in the
//   `services` map (published ports on the data-path address, VIPs; an
//   every-port VIP with port 0), and
//   with egress on (config.egress_ip not 0) the replies to the tasks'
//   egress connections: TCP/UDP to the egress address with a destination
//   port in the egress range, ICMP echo replies to it with an id in the
//   range, and ICMP errors (types 3, 11, 12) to it quoting a packet from
//   the egress address whose TCP/UDP source port (or echo id) is in the
//   range. Everything else (ARP, SSH, the management plane, the kernel's
//   own ICMP) goes to the kernel.
// steer_all: on a task port, every frame goes to the socket.
//
// With no socket in the queue's slot, frames go to the kernel (XDP_PASS),
// never to a black hole. Counters: `stats` [0] redirected, [1] passed,
// [2] matched (chosen for the socket, counted before the redirect, so that
// BPF_PROG_TEST_RUN without a socket shows the program's choice).

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/in.h>
#include <linux/udp.h>
#include <linux/tcp.h>
#include <linux/icmp.h>

#define SEC(name) __attribute__((section(name), used))
#define __uint(name, val) int (*name)[val]
#define __type(name, val) typeof(val) *name

// Helper ids from linux/bpf.h's ___BPF_FUNC_MAPPER.
static void *(*bpf_map_lookup_elem)(void *map, const void *key) = (void *)1;
static long (*bpf_redirect_map)(void *map, __u64 key, __u64 flags) = (void *)51;

struct config {
    __u32 data_ip;    // network order
    __u16 vxlan_port; // network order
    __u16 pad;
    __u32 egress_ip;  // network order; 0: egress off
    __u16 egress_lo;  // host order, inclusive
    __u16 egress_hi;  // host order, inclusive
};

struct service_key {
    __u32 ip;   // network order
    __u16 port; // network order
    __u8 proto;
    __u8 pad;
};

struct {
    __uint(type, BPF_MAP_TYPE_XSKMAP);
    __uint(max_entries, 64);
    __type(key, __u32);
    __type(value, __u32);
} xsks SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_ARRAY);
    __uint(max_entries, 1);
    __type(key, __u32);
    __type(value, struct config);
} config SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_HASH);
    __uint(max_entries, 4096);
    __type(key, struct service_key);
    __type(value, __u8);
} services SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_ARRAY);
    __uint(max_entries, 3);
    __type(key, __u32);
    __type(value, __u64);
} stats SEC(".maps");

static __always_inline int count(__u32 which, int verdict)
{
    __u64 *n = bpf_map_lookup_elem(&stats, &which);
    if (n)
        __sync_fetch_and_add(n, 1);
    return verdict;
}

static __always_inline int to_socket(struct xdp_md *ctx)
{
    count(2, 0);
    int v = bpf_redirect_map(&xsks, ctx->rx_queue_index, XDP_PASS);
    return count(v == XDP_REDIRECT ? 0 : 1, v);
}

// True if `port_be` (network order) lies in the egress range.
static __always_inline int egress_port(const struct config *cfg, __u16 port_be)
{
    __u16 p = __builtin_bswap16(port_be);
    return p >= cfg->egress_lo && p <= cfg->egress_hi;
}

// ICMP to the egress address (`icmp` at l4): an echo reply whose id is in
// the range, or an error (3, 11, 12) quoting a TCP/UDP packet or an echo
// request sent from the egress address with its source port or id in the
// range. Every access is bounds-checked for the verifier.
static __always_inline int egress_icmp(const struct config *cfg, void *l4, void *end)
{
    struct icmphdr *ic = l4;
    if ((void *)(ic + 1) > end)
        return 0;
    if (ic->type == ICMP_ECHOREPLY)
        return egress_port(cfg, ic->un.echo.id);
    if (ic->type != ICMP_DEST_UNREACH && ic->type != ICMP_TIME_EXCEEDED && ic->type != ICMP_PARAMETERPROB)
        return 0;
    struct iphdr *in = (void *)(ic + 1);
    if ((void *)(in + 1) > end || in->version != 4)
        return 0;
    __u32 ihl = in->ihl & 0xf;
    if (ihl < 5 || in->saddr != cfg->egress_ip)
        return 0;
    __u8 *q = (__u8 *)in + ihl * 4;
    if ((void *)(q + 8) > end)
        return 0;
    if (in->protocol == IPPROTO_TCP || in->protocol == IPPROTO_UDP)
        return egress_port(cfg, *(__u16 *)q);
    if (in->protocol == IPPROTO_ICMP && q[0] == ICMP_ECHO)
        return egress_port(cfg, *(__u16 *)(q + 4));
    return 0;
}

SEC("xdp")
int steer_uplink(struct xdp_md *ctx)
{
    void *data = (void *)(long)ctx->data;
    void *end = (void *)(long)ctx->data_end;
    struct ethhdr *eth = data;
    if ((void *)(eth + 1) > end || eth->h_proto != __builtin_bswap16(ETH_P_IP))
        return count(1, XDP_PASS);
    struct iphdr *ip = (void *)(eth + 1);
    if ((void *)(ip + 1) > end || ip->version != 4 || ip->ihl < 5)
        return count(1, XDP_PASS);
    // Later fragments carry no ports: the kernel's.
    if (ip->frag_off & __builtin_bswap16(0x1fff))
        return count(1, XDP_PASS);
    void *l4 = (void *)ip + ip->ihl * 4;
    __u32 zero = 0;
    struct config *cfg = bpf_map_lookup_elem(&config, &zero);
    if (!cfg)
        return count(1, XDP_PASS);
    int egress = cfg->egress_ip != 0 && ip->daddr == cfg->egress_ip;
    __u16 dport;
    if (ip->protocol == IPPROTO_UDP) {
        struct udphdr *udp = l4;
        if ((void *)(udp + 1) > end)
            return count(1, XDP_PASS);
        dport = udp->dest;
        if (ip->daddr == cfg->data_ip && dport == cfg->vxlan_port)
            return to_socket(ctx);
    } else if (ip->protocol == IPPROTO_TCP) {
        struct tcphdr *tcp = l4;
        if ((void *)(tcp + 1) > end)
            return count(1, XDP_PASS);
        dport = tcp->dest;
    } else if (ip->protocol == IPPROTO_ICMP && egress) {
        return egress_icmp(cfg, l4, end) ? to_socket(ctx) : count(1, XDP_PASS);
    } else {
        return count(1, XDP_PASS);
    }
    // A reply to an egress connection (before the map lookup: no lookup
    // for the common case).
    if (egress && egress_port(cfg, dport))
        return to_socket(ctx);
    struct service_key k = { .ip = ip->daddr, .port = dport, .proto = ip->protocol, .pad = 0 };
    if (bpf_map_lookup_elem(&services, &k))
        return to_socket(ctx);
    // An every-port VIP is in the map with port 0.
    k.port = 0;
    if (bpf_map_lookup_elem(&services, &k))
        return to_socket(ctx);
    return count(1, XDP_PASS);
}

SEC("xdp")
int steer_all(struct xdp_md *ctx)
{
    return to_socket(ctx);
}

char _license[] SEC("license") = "Dual BSD/GPL";
