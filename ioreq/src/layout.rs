//! Where an HVM guest's RAM is in its guest-physical address space.
//!
//! Xen's toolstack and hvmloader leave a hole below 4 GiB for MMIO: RAM fills
//! `[0, min(ram, 0xF000_0000))` and the rest is relocated to start at 4 GiB (QEMU's
//! `xen_ram_init` uses the same split, `HVM_BELOW_4G_RAM_END`). `data_is_ptr` buffers must lie
//! inside one region; the mapping cache maps within regions only.

/// End of RAM below 4 GiB (`HVM_BELOW_4G_RAM_END`, xen/include/public/hvm/e820.h).
pub const BELOW_4G_RAM_END: u64 = 0xF000_0000;
/// Where relocated RAM starts.
pub const FOUR_GIB: u64 = 1 << 32;

/// The RAM regions of one guest, sorted, not overlapping, each `[start, end)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RamLayout {
    regions: Vec<(u64, u64)>,
}

impl RamLayout {
    /// `ram_bytes` from guest-physical 0 with no hole (xensim's guests, small guests).
    pub fn flat(ram_bytes: u64) -> RamLayout {
        RamLayout {
            regions: if ram_bytes == 0 {
                Vec::new()
            } else {
                vec![(0, ram_bytes)]
            },
        }
    }

    /// The layout Xen gives an HVM guest of `ram_bytes`: below the MMIO hole, then from 4 GiB.
    pub fn hvm(ram_bytes: u64) -> RamLayout {
        let low = ram_bytes.min(BELOW_4G_RAM_END);
        let high = ram_bytes - low;
        let mut regions = Vec::with_capacity(2);
        if low > 0 {
            regions.push((0, low));
        }
        if high > 0 {
            regions.push((FOUR_GIB, FOUR_GIB.saturating_add(high)));
        }
        RamLayout { regions }
    }

    /// The regions.
    pub fn regions(&self) -> &[(u64, u64)] {
        &self.regions
    }

    /// Total RAM bytes.
    pub fn total(&self) -> u64 {
        self.regions.iter().map(|(s, e)| e - s).sum()
    }

    /// The region holding `gpa`, if any.
    pub fn region_of(&self, gpa: u64) -> Option<(u64, u64)> {
        self.regions
            .iter()
            .copied()
            .find(|&(s, e)| gpa >= s && gpa < e)
    }

    /// Whether `[gpa, gpa + len)` lies inside one region (an empty range at a region's end
    /// counts).
    pub fn contains(&self, gpa: u64, len: u64) -> bool {
        let Some(end) = gpa.checked_add(len) else {
            return false;
        };
        self.regions
            .iter()
            .any(|&(s, e)| gpa >= s && end <= e && (gpa < e || len == 0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_guest_is_one_region_and_large_guest_is_split_at_the_hole() {
        assert_eq!(RamLayout::hvm(1 << 30).regions(), &[(0, 1 << 30)]);
        let big = RamLayout::hvm(8 << 30);
        assert_eq!(
            big.regions(),
            &[
                (0, BELOW_4G_RAM_END),
                (FOUR_GIB, FOUR_GIB + (8 << 30) - BELOW_4G_RAM_END)
            ]
        );
        assert_eq!(big.total(), 8 << 30);
        // 5 GiB is RAM; the hole is not; a buffer may not straddle the hole.
        assert!(big.contains(5 << 30, 4096));
        assert!(!big.contains(0xF000_0000, 1));
        assert!(!big.contains(0xEFFF_F000, 0x2000));
        assert!(!big.contains(u64::MAX - 1, 4));
        assert_eq!(big.region_of(0xF800_0000), None);
    }
}
