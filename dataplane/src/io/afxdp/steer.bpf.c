// SPDX-License-Identifier: Apache-2.0
// meshplane's XDP steering programs, compiled by clang at build time
// (dataplane/build.rs) and attached one per interface by io::afxdp.
//
// steer_uplink: on the data-path NIC, only dataplane traffic goes to the
//   AF_XDP socket of the receiving queue: UDP to the VXLAN port on the
//   data-path address, and TCP/UDP to an (address, port, protocol) in the
//   `services` map (published ports on the data-path address, VIPs).
//   Everything else (ARP, SSH, the management plane) goes to the kernel.
// steer_all: on a task port, every frame goes to the socket.
//
// With no socket in the queue's slot, frames go to the kernel (XDP_PASS),
// never to a black hole. Counters: `stats` [0] redirected, [1] passed.

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/in.h>
#include <linux/udp.h>
#include <linux/tcp.h>

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
    __uint(max_entries, 2);
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
    int v = bpf_redirect_map(&xsks, ctx->rx_queue_index, XDP_PASS);
    return count(v == XDP_REDIRECT ? 0 : 1, v);
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
    } else {
        return count(1, XDP_PASS);
    }
    struct service_key k = { .ip = ip->daddr, .port = dport, .proto = ip->protocol, .pad = 0 };
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
