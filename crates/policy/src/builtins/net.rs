//! net.cidr_intersects, net.cidr_contains_matches and net.cidr_merge, following OPA's
//! `topdown/cidr.go`
//! and Go's `net.ParseCIDR` / `net.ParseIP`, quirks included: a bare IPv4 address given
//! to cidr_merge takes its classful default mask.

use std::collections::BTreeSet;
use std::net::IpAddr;

use anyhow::{Result, anyhow, bail};
use regorus::Value;

use super::string_arg;

/// A network as Go's `net.IPNet`: the address as given (masked by ParseCIDR) and the
/// prefix length; IPv4 in 4 bytes, IPv6 in 16.
#[derive(Clone, Debug)]
struct Net {
    ip: Vec<u8>,
    prefix: u32,
}

impl Net {
    fn bits(&self) -> u32 {
        (self.ip.len() * 8) as u32
    }

    fn first(&self) -> u128 {
        to_int(&self.ip) & mask(self.prefix, self.bits())
    }

    fn last(&self) -> u128 {
        self.first() | !mask(self.prefix, self.bits()) & all_ones(self.bits())
    }

    /// Go's `IPNet.Contains`: the network and the address are both taken in their
    /// 4-byte form when they have one (an IPv4-mapped IPv6 network is an IPv4 network,
    /// its mask's last 32 bits), and an address of the other length is not contained:
    /// no IPv4 address is inside `::/0`.
    fn contains(&self, ip: &[u8]) -> bool {
        let (net, prefix) = match to4(&self.ip) {
            Some(v4) if self.ip.len() == 16 => (v4, self.prefix.saturating_sub(96)),
            Some(v4) => (v4, self.prefix),
            None => (self.ip.clone(), self.prefix),
        };
        let ip = to4(ip).unwrap_or_else(|| ip.to_vec());
        if ip.len() != net.len() {
            return false;
        }
        let bits = (net.len() * 8) as u32;
        to_int(&ip) & mask(prefix, bits) == to_int(&net) & mask(prefix, bits)
    }

    fn to_string_go(&self) -> String {
        format!("{}/{}", ip_string(&self.ip), self.prefix)
    }
}

fn all_ones(bits: u32) -> u128 {
    if bits >= 128 {
        u128::MAX
    } else {
        (1u128 << bits) - 1
    }
}

fn mask(prefix: u32, bits: u32) -> u128 {
    if prefix == 0 {
        0
    } else {
        all_ones(bits) & !all_ones(bits - prefix)
    }
}

fn to_int(ip: &[u8]) -> u128 {
    ip.iter().fold(0u128, |acc, b| (acc << 8) | u128::from(*b))
}

fn from_int(v: u128, len: usize) -> Vec<u8> {
    (0..len).rev().map(|i| (v >> (8 * i)) as u8).collect()
}

fn to4(ip: &[u8]) -> Option<Vec<u8>> {
    match ip.len() {
        4 => Some(ip.to_vec()),
        16 if ip[..10].iter().all(|b| *b == 0) && ip[10] == 0xff && ip[11] == 0xff => {
            Some(ip[12..].to_vec())
        }
        _ => None,
    }
}

fn to16(ip: &[u8]) -> Option<Vec<u8>> {
    match ip.len() {
        16 => Some(ip.to_vec()),
        4 => {
            let mut v = vec![0u8; 10];
            v.extend([0xff, 0xff]);
            v.extend(ip);
            Some(v)
        }
        _ => None,
    }
}

/// Go's `net.IP.String`.
fn ip_string(ip: &[u8]) -> String {
    match ip.len() {
        4 => std::net::Ipv4Addr::new(ip[0], ip[1], ip[2], ip[3]).to_string(),
        _ => {
            let v6 = std::net::Ipv6Addr::from(u128::to_be_bytes(to_int(ip)));
            match to4(ip) {
                Some(v4) => std::net::Ipv4Addr::new(v4[0], v4[1], v4[2], v4[3]).to_string(),
                None => v6.to_string(),
            }
        }
    }
}

/// Go's `net.ParseIP`: IPv4 in 16-byte form is kept as 4 bytes here (Go's `To4`
/// applies wherever it matters).
fn parse_ip(s: &str) -> Option<Vec<u8>> {
    if s.contains('%') {
        return None;
    }
    match s.parse::<IpAddr>().ok()? {
        IpAddr::V4(v4) => Some(v4.octets().to_vec()),
        IpAddr::V6(v6) => Some(v6.octets().to_vec()),
    }
}

/// Go's `net.ParseCIDR`: the network (masked) of "addr/prefix".
fn parse_cidr(s: &str) -> Result<Net> {
    let err = || anyhow!("invalid CIDR address: {s}");
    let (addr, prefix) = s.split_once('/').ok_or_else(err)?;
    let ip = parse_ip(addr).ok_or_else(err)?;
    if prefix.is_empty() || !prefix.bytes().all(|b| b.is_ascii_digit()) || prefix.len() > 3 {
        return Err(err());
    }
    let prefix: u32 = prefix.parse().map_err(|_| err())?;
    // An IPv4-mapped IPv6 address with a v6 prefix stays v6 in Go.
    let ip = if addr.contains(':') {
        to16(&ip).ok_or_else(err)?
    } else {
        ip
    };
    let bits = (ip.len() * 8) as u32;
    if prefix > bits {
        return Err(err());
    }
    let masked = from_int(to_int(&ip) & mask(prefix, bits), ip.len());
    Ok(Net { ip: masked, prefix })
}

fn cidr_arg(args: &[Value], i: usize) -> Result<Net> {
    parse_cidr(string_arg(args, i)?)
}

/// net.cidr_intersects(a, b): whether either network holds the other's first address.
pub(super) fn cidr_intersects(args: &[Value]) -> Result<Value> {
    let a = cidr_arg(args, 0)?;
    let b = cidr_arg(args, 1)?;
    Ok(Value::from(a.contains(&b.ip) || b.contains(&a.ip)))
}

/// `net.cidr_contains(cidr, cidr_or_ip)` as OPA (Go's `IPNet.Contains`): replaces
/// regorus's, which does not match an IPv4 address (or the IPv4 form of an
/// IPv4-mapped one) as Go does.
pub(super) fn cidr_contains(args: &[Value]) -> Result<Value> {
    let a = cidr_arg(args, 0)?;
    let b = string_arg(args, 1)?;
    Ok(Value::from(contains_str(&a, b)?))
}

fn contains_str(a: &Net, b: &str) -> Result<bool> {
    if let Some(ip) = parse_ip(b) {
        return Ok(a.contains(&ip));
    }
    let b = parse_cidr(b)
        .map_err(|_| anyhow!("not a valid textual representation of an IP address or CIDR: {b}"))?;
    Ok(a.contains(&b.ip) && a.contains(&from_int(b.last(), b.ip.len())))
}

/// The (cidr, index) pairs of a cidr_contains_matches operand.
fn match_terms(operand: usize, v: &Value) -> Result<Vec<(Value, Value)>> {
    let cidr_of = |x: &Value| -> Result<Value> {
        match x {
            Value::String(_) => Ok(x.clone()),
            Value::Array(items) if !items.is_empty() => Ok(items[0].clone()),
            _ => bail!("operand {operand}: element must be string or non-empty array"),
        }
    };
    Ok(match v {
        Value::String(_) => vec![(v.clone(), v.clone())],
        Value::Array(items) => items
            .iter()
            .enumerate()
            .map(|(i, x)| Ok((cidr_of(x)?, Value::from(i as u64))))
            .collect::<Result<_>>()?,
        Value::Set(items) => items
            .iter()
            .map(|x| Ok((cidr_of(x)?, x.clone())))
            .collect::<Result<_>>()?,
        Value::Object(fields) => fields
            .iter()
            .map(|(k, x)| Ok((cidr_of(x)?, k.clone())))
            .collect::<Result<_>>()?,
        _ => Vec::new(),
    })
}

/// net.cidr_contains_matches(cidrs, cidrs_or_ips): the set of [index1, index2] pairs
/// where the first operand's CIDR contains the second's CIDR or IP.
pub(super) fn cidr_contains_matches(args: &[Value]) -> Result<Value> {
    let a = match_terms(1, args.first().unwrap_or(&Value::Undefined))?;
    let b = match_terms(2, args.get(1).unwrap_or(&Value::Undefined))?;
    let mut out = BTreeSet::new();
    for (cidr1, index1) in &a {
        for (cidr2, index2) in &b {
            let net = parse_cidr(string_of(cidr1)?)?;
            if contains_str(&net, string_of(cidr2)?)? {
                out.insert(Value::from(vec![index1.clone(), index2.clone()]));
            }
        }
    }
    Ok(Value::from(out))
}

fn string_of(v: &Value) -> Result<&str> {
    match v {
        Value::String(s) => Ok(s.as_ref()),
        _ => bail!("operand must be string"),
    }
}

/// A cidr_merge element: a CIDR, or an IPv4 address with its classful default mask
/// (Go's `IP.DefaultMask`), unmasked; a bare IPv6 address is an error.
fn merge_element(v: &Value) -> Result<Net> {
    let s = match v {
        Value::String(s) => s.as_ref(),
        _ => bail!("element must be string"),
    };
    let Some(ip) = parse_ip(s) else {
        return parse_cidr(s);
    };
    let Some(v4) = to4(&ip) else {
        bail!("IPv6 invalid: needs prefix length");
    };
    let prefix = match v4[0] {
        0..0x80 => 8,
        0x80..0xc0 => 16,
        _ => 24,
    };
    Ok(Net { ip: v4, prefix })
}

/// The fewest CIDRs covering [first, last] (the netaddr algorithm OPA uses).
fn range_to_cidrs(first: u128, last: u128, len: usize) -> Vec<Net> {
    let bits = (len * 8) as u32;
    let mut out = Vec::new();
    let mut start = first;
    loop {
        let mut prefix = bits;
        while prefix > 0 {
            let m = mask(prefix - 1, bits);
            let candidate_first = start & m;
            let candidate_last = candidate_first | (!m & all_ones(bits));
            if candidate_first != start || candidate_last > last {
                break;
            }
            prefix -= 1;
        }
        let net = Net {
            ip: from_int(start, len),
            prefix,
        };
        let end = net.last();
        out.push(net);
        if end >= last {
            break;
        }
        start = end + 1;
    }
    out
}

/// net.cidr_merge(addrs): the set of the smallest list of CIDRs covering them.
pub(super) fn cidr_merge(args: &[Value]) -> Result<Value> {
    let items: Vec<&Value> = match args.first() {
        Some(Value::Array(items)) => items.iter().collect(),
        Some(Value::Set(items)) => items.iter().collect(),
        _ => bail!("operand must be an array"),
    };
    let nets = items
        .into_iter()
        .map(merge_element)
        .collect::<Result<Vec<_>>>()?;
    // (first, last, the network when not merged), sorted by last then first.
    let mut ranges: Vec<(Vec<u8>, Vec<u8>, Option<Net>)> = nets
        .into_iter()
        .map(|n| {
            let len = n.ip.len();
            (from_int(n.first(), len), from_int(n.last(), len), Some(n))
        })
        .collect();
    ranges.sort_by(|a, b| a.1.cmp(&b.1).then_with(|| a.0.cmp(&b.0)));
    let mut i = ranges.len();
    while i > 1 {
        i -= 1;
        let previous = previous_ip(&ranges[i].0);
        if previous.as_slice() <= ranges[i - 1].1.as_slice() {
            let first = if ranges[i - 1].0 < ranges[i].0 {
                ranges[i - 1].0.clone()
            } else {
                ranges[i].0.clone()
            };
            let last = ranges[i].1.clone();
            ranges[i - 1] = (first, last, None);
            ranges.remove(i);
        }
    }
    let mut out = BTreeSet::new();
    for (first, last, net) in ranges {
        match net {
            Some(n) => {
                out.insert(Value::from(n.to_string_go()));
            }
            None => {
                for n in range_to_cidrs(to_int(&first), to_int(&last), first.len()) {
                    out.insert(Value::from(n.to_string_go()));
                }
            }
        }
    }
    Ok(Value::from(out))
}

/// The address before `ip` (wrapping at zero, as OPA's helper does).
fn previous_ip(ip: &[u8]) -> Vec<u8> {
    from_int(
        to_int(ip).wrapping_sub(1) & all_ones((ip.len() * 8) as u32),
        ip.len(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn merge(items: &[&str]) -> Vec<String> {
        let arr = Value::from(items.iter().map(|s| Value::from(*s)).collect::<Vec<_>>());
        let out = cidr_merge(&[arr]).unwrap();
        out.as_set()
            .unwrap()
            .iter()
            .map(|v| v.as_string().unwrap().to_string())
            .collect()
    }

    #[test]
    fn merges_adjacent_and_contained_networks() {
        assert_eq!(
            merge(&["192.0.128.0/24", "192.0.129.0/24"]),
            ["192.0.128.0/23"]
        );
        assert_eq!(merge(&["10.0.0.0/8", "10.1.0.0/16"]), ["10.0.0.0/8"]);
        assert_eq!(
            merge(&["10.0.0.0/32", "10.0.0.1/32", "10.0.0.2/32"]),
            ["10.0.0.0/31", "10.0.0.2/32"]
        );
    }

    #[test]
    fn intersects_either_way() {
        let s = |x: &str| Value::from(x);
        assert_eq!(
            cidr_intersects(&[s("10.0.0.0/8"), s("10.1.0.0/16")]).unwrap(),
            Value::from(true)
        );
        assert_eq!(
            cidr_intersects(&[s("10.0.0.0/16"), s("10.1.0.0/16")]).unwrap(),
            Value::from(false)
        );
    }
}
