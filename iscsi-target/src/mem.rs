//! An in-memory [`Backend`] for tests, fuzzing and examples.
//!
//! Blocks live in a sparse map behind one mutex, one entry per logical block of the LUN (512
//! or 4096 bytes, [`LunInfo::block_size`]): a block never written (or unmapped) reads as
//! zeroes and is reported deallocated on thin LUNs. Offsets need not be block-aligned (a
//! partial block is read, changed and stored whole). COMPARE AND WRITE holds the lock across
//! its compare and its write, and the reservation state is replaced only when its version
//! matches, as the cluster backend does. Software write protect is a field of the stored LUN,
//! so every target that lists the LUN shows it; a write fence is set per target and LUN
//! ([`MemBackend::set_write_fence`]). Faults can be injected: failing reads or
//! writes, a LUN that is not ready, lost compare-and-set races.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Mutex, MutexGuard};

use crate::backend::{
    AluaState, Backend, BackendError, CompareOutcome, LOGICAL_BLOCK_SIZES, LunInfo, PortGroup,
    Provisioning, WriteFence,
};
use crate::scsi::pr::PrState;

/// Faults to inject.
#[derive(Clone, Debug, Default)]
pub struct Faults {
    /// Every read fails with this error.
    pub read: Option<BackendError>,
    /// Every write, unmap, write-zeroes, flush, compare-and-write, reservation update and
    /// write-protect change fails with this error.
    pub write: Option<BackendError>,
    /// This many next reservation updates lose their compare-and-set race.
    pub lost_races: u32,
}

#[derive(Debug)]
struct LunData {
    /// The logical block size the blocks are kept in.
    block_size: u64,
    /// Written blocks by logical block number; absent blocks read as zeroes.
    blocks: BTreeMap<u64, Box<[u8]>>,
}

impl LunData {
    fn new(block_size: u32) -> LunData {
        LunData {
            block_size: u64::from(block_size.max(1)),
            blocks: BTreeMap::new(),
        }
    }
}

#[derive(Debug, Default)]
struct Inner {
    /// Each target's LUNs.
    targets: BTreeMap<String, Vec<LunInfo>>,
    /// Per target, the initiators allowed each LUN; a LUN without an entry is open to all.
    acl: HashMap<(String, u64), Vec<String>>,
    /// Data by LUN uuid.
    data: HashMap<[u8; 16], LunData>,
    /// Reservation state by LUN uuid.
    reservations: HashMap<[u8; 16], PrState>,
    /// The port groups every LUN reports.
    groups: Vec<PortGroup>,
    /// Bumped by every change of the LUN tables or ACLs.
    generation: u64,
    faults: Faults,
    flushes: u64,
    fua_writes: u64,
}

/// An in-memory backend.
#[derive(Debug, Default)]
pub struct MemBackend {
    inner: Mutex<Inner>,
}

impl MemBackend {
    /// An empty backend: no targets, one port group (id 1, port 1, active/optimized).
    pub fn new() -> MemBackend {
        let b = MemBackend::default();
        b.lock().groups = vec![PortGroup {
            id: 1,
            state: AluaState::ActiveOptimized,
            relative_ports: vec![1],
        }];
        b
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds (or replaces) a LUN of `target`, creating the target.
    ///
    /// # Panics
    ///
    /// When the block size is not 512 or 4096 or the size is not a multiple of it (a test
    /// set-up error).
    pub fn add_lun(&self, target: &str, lun: LunInfo) {
        assert!(
            LOGICAL_BLOCK_SIZES.contains(&lun.block_size),
            "a LUN's block size is 512 or 4096, not {}",
            lun.block_size
        );
        assert!(
            lun.size_bytes.is_multiple_of(u64::from(lun.block_size)),
            "the LUN's size {} is not a multiple of its block size {}",
            lun.size_bytes,
            lun.block_size
        );
        let mut g = self.lock();
        let bs = u64::from(lun.block_size);
        let data = g
            .data
            .entry(lun.uuid)
            .or_insert_with(|| LunData::new(lun.block_size));
        if data.block_size != bs {
            // A new block size is a new disk.
            *data = LunData::new(lun.block_size);
        }
        let luns = g.targets.entry(target.to_string()).or_default();
        luns.retain(|l| l.lun != lun.lun);
        luns.push(lun);
        luns.sort_by_key(|l| l.lun);
        g.generation += 1;
    }

    /// Creates LUN `lun` of `target` with `blocks` logical blocks of `block_size` bytes (512 or
    /// 4096), named `disk<lun>`, with a uuid made from the target and LUN number, and returns
    /// it.
    ///
    /// ```
    /// # use csvd_iscsi_target::mem::MemBackend;
    /// # use csvd_iscsi_target::backend::Backend;
    /// let mem = MemBackend::new();
    /// let lun = mem.create_lun("iqn.2024-01.test:t", 0, 100, 512, true);
    /// assert_eq!((lun.blocks(), lun.size_bytes), (100, 51_200));
    /// assert_eq!(mem.luns("iqn.2024-01.test:t"), vec![lun]);
    /// ```
    pub fn create_lun(
        &self,
        target: &str,
        lun: u64,
        blocks: u64,
        block_size: u32,
        thin: bool,
    ) -> LunInfo {
        // FNV-1a over the target name and the LUN number, spread over 16 bytes.
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in target.bytes().chain(lun.to_be_bytes()) {
            h = (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
        }
        let mut uuid = [0u8; 16];
        uuid[..8].copy_from_slice(&h.to_be_bytes());
        uuid[8..].copy_from_slice(&h.rotate_left(29).wrapping_mul(3).to_be_bytes());
        let info = LunInfo {
            lun,
            uuid,
            name: format!("disk{lun}"),
            size_bytes: blocks * u64::from(block_size),
            block_size,
            thin,
            write_protected: false,
            write_fence: None,
        };
        self.add_lun(target, info.clone());
        info
    }

    /// Adds a target without LUNs.
    pub fn add_target(&self, target: &str) {
        let mut g = self.lock();
        g.targets.entry(target.to_string()).or_default();
        g.generation += 1;
    }

    /// Removes a LUN of `target` (its data stays, under its uuid).
    pub fn remove_lun(&self, target: &str, lun: u64) {
        let mut g = self.lock();
        if let Some(luns) = g.targets.get_mut(target) {
            luns.retain(|l| l.lun != lun);
        }
        g.generation += 1;
    }

    /// Changes a LUN's size.
    pub fn resize_lun(&self, target: &str, lun: u64, size_bytes: u64) {
        let mut g = self.lock();
        if let Some(l) = g
            .targets
            .get_mut(target)
            .and_then(|ls| ls.iter_mut().find(|l| l.lun == lun))
        {
            l.size_bytes = size_bytes;
        }
        g.generation += 1;
    }

    /// Sets (or with `None` removes) the write fence of LUN `lun` of `target`
    /// ([`LunInfo::write_fence`]).
    ///
    /// ```
    /// # use csvd_iscsi_target::mem::MemBackend;
    /// # use csvd_iscsi_target::backend::{Backend, WriteFence};
    /// let mem = MemBackend::new();
    /// mem.create_lun("iqn.2024-01.test:t", 0, 100, 512, true);
    /// let fence = WriteFence {
    ///     prefix: "iqn.2024-01.test:host-".into(),
    ///     allowed: vec!["iqn.2024-01.test:host-1".into()],
    /// };
    /// mem.set_write_fence("iqn.2024-01.test:t", 0, Some(fence));
    /// let lun = &mem.luns("iqn.2024-01.test:t")[0];
    /// assert!(lun.may_write("iqn.2024-01.test:host-1"));
    /// assert!(!lun.may_write("iqn.2024-01.test:host-2"));
    /// ```
    pub fn set_write_fence(&self, target: &str, lun: u64, fence: Option<WriteFence>) {
        let mut g = self.lock();
        if let Some(l) = g
            .targets
            .get_mut(target)
            .and_then(|ls| ls.iter_mut().find(|l| l.lun == lun))
        {
            l.write_fence = fence;
        }
        g.generation += 1;
    }

    /// Restricts a LUN to the listed initiator names (`None`: open to all).
    pub fn set_acl(&self, target: &str, lun: u64, initiators: Option<Vec<String>>) {
        let mut g = self.lock();
        match initiators {
            Some(i) => g.acl.insert((target.to_string(), lun), i),
            None => g.acl.remove(&(target.to_string(), lun)),
        };
        g.generation += 1;
    }

    /// Sets the port groups every LUN reports.
    pub fn set_port_groups(&self, groups: Vec<PortGroup>) {
        self.lock().groups = groups;
    }

    /// Sets the state of port group `id`.
    pub fn set_alua_state(&self, id: u16, state: AluaState) {
        for g in self.lock().groups.iter_mut().filter(|g| g.id == id) {
            g.state = state;
        }
    }

    /// Replaces the injected faults.
    pub fn set_faults(&self, faults: Faults) {
        self.lock().faults = faults;
    }

    /// The reservation state of the LUN with `uuid`.
    pub fn reservation_state(&self, uuid: &[u8; 16]) -> PrState {
        self.lock()
            .reservations
            .get(uuid)
            .cloned()
            .unwrap_or_default()
    }

    /// Replaces the reservation state of the LUN with `uuid`.
    pub fn set_reservation_state(&self, uuid: &[u8; 16], state: PrState) {
        self.lock().reservations.insert(*uuid, state);
    }

    /// Whether logical block `lba` of the LUN with `uuid` holds data.
    pub fn is_mapped(&self, uuid: &[u8; 16], lba: u64) -> bool {
        self.lock()
            .data
            .get(uuid)
            .is_some_and(|d| d.blocks.contains_key(&lba))
    }

    /// How many flushes (and FUA writes) were done.
    pub fn flushes(&self) -> (u64, u64) {
        let g = self.lock();
        (g.flushes, g.fua_writes)
    }

    /// The data of `lun`, created with the LUN's block size when missing.
    fn data_mut<'a>(g: &'a mut Inner, lun: &LunInfo) -> &'a mut LunData {
        g.data
            .entry(lun.uuid)
            .or_insert_with(|| LunData::new(lun.block_size))
    }

    /// Copies `len` bytes at `offset` of `lun` into a new vector.
    fn read_locked(g: &Inner, lun: &LunInfo, offset: u64, len: u64) -> Vec<u8> {
        let mut out = vec![0u8; len as usize];
        if let Some(d) = g.data.get(&lun.uuid) {
            let bs = d.block_size;
            let mut at = 0u64;
            while at < len {
                let pos = offset + at;
                let (blk, within) = (pos / bs, pos % bs);
                let n = (bs - within).min(len - at);
                if let Some(b) = d.blocks.get(&blk) {
                    let w = within as usize;
                    out[at as usize..(at + n) as usize].copy_from_slice(&b[w..w + n as usize]);
                }
                at += n;
            }
        }
        out
    }

    /// Stores `data` at `offset` of `lun`, mapping the blocks it touches.
    fn write_locked(g: &mut Inner, lun: &LunInfo, offset: u64, data: &[u8]) {
        let d = Self::data_mut(g, lun);
        let bs = d.block_size;
        let len = data.len() as u64;
        let mut at = 0u64;
        while at < len {
            let pos = offset + at;
            let (blk, within) = (pos / bs, pos % bs);
            let n = (bs - within).min(len - at);
            let b = d
                .blocks
                .entry(blk)
                .or_insert_with(|| vec![0u8; bs as usize].into_boxed_slice());
            let w = within as usize;
            b[w..w + n as usize].copy_from_slice(&data[at as usize..(at + n) as usize]);
            at += n;
        }
    }

    /// Deallocates whole blocks of `lun` in the range and zeroes partial ones.
    fn unmap_locked(g: &mut Inner, lun: &LunInfo, offset: u64, len: u64) {
        let bs = Self::data_mut(g, lun).block_size;
        let end = offset + len;
        let (first, last) = (offset.div_ceil(bs), end / bs);
        if first >= last {
            Self::write_locked(g, lun, offset, &vec![0; len as usize]);
            return;
        }
        if offset < first * bs {
            Self::write_locked(g, lun, offset, &vec![0; (first * bs - offset) as usize]);
        }
        if last * bs < end {
            Self::write_locked(g, lun, last * bs, &vec![0; (end - last * bs) as usize]);
        }
        let d = Self::data_mut(g, lun);
        let keys: Vec<u64> = d.blocks.range(first..last).map(|(k, _)| *k).collect();
        for k in keys {
            d.blocks.remove(&k);
        }
    }

    /// Checks that the range lies within the LUN as the backend knows it now.
    fn check(g: &Inner, lun: &LunInfo, offset: u64, len: u64) -> Result<(), BackendError> {
        let size = g
            .targets
            .values()
            .flatten()
            .find(|l| l.uuid == lun.uuid)
            .map(|l| l.size_bytes)
            .ok_or(BackendError::OutOfRange)?;
        match offset.checked_add(len) {
            Some(end) if end <= size => Ok(()),
            _ => Err(BackendError::OutOfRange),
        }
    }

    fn write_fault(g: &Inner) -> Result<(), BackendError> {
        g.faults.write.clone().map_or(Ok(()), Err)
    }
}

impl Backend for MemBackend {
    type Buf = Vec<u8>;

    fn buffer(&self, len: usize) -> Vec<u8> {
        vec![0u8; len]
    }

    fn targets(&self) -> Vec<String> {
        self.lock().targets.keys().cloned().collect()
    }

    fn luns(&self, target: &str) -> Vec<LunInfo> {
        self.lock().targets.get(target).cloned().unwrap_or_default()
    }

    fn luns_generation(&self, _target: &str) -> Option<u64> {
        Some(self.lock().generation)
    }

    fn allows(&self, target: &str, lun: &LunInfo, initiator: &str) -> bool {
        match self.lock().acl.get(&(target.to_string(), lun.lun)) {
            Some(list) => list.iter().any(|i| i == initiator),
            None => true,
        }
    }

    fn port_groups(&self, _lun: &LunInfo) -> Vec<PortGroup> {
        self.lock().groups.clone()
    }

    async fn read(&self, lun: &LunInfo, offset: u64, len: u64) -> Result<Vec<u8>, BackendError> {
        let g = self.lock();
        if let Some(e) = g.faults.read.clone() {
            return Err(e);
        }
        Self::check(&g, lun, offset, len)?;
        Ok(Self::read_locked(&g, lun, offset, len))
    }

    async fn write(
        &self,
        lun: &LunInfo,
        offset: u64,
        data: Vec<u8>,
        fua: bool,
    ) -> Result<(), BackendError> {
        let mut g = self.lock();
        Self::write_fault(&g)?;
        Self::check(&g, lun, offset, data.len() as u64)?;
        Self::write_locked(&mut g, lun, offset, &data);
        if fua {
            g.fua_writes += 1;
        }
        Ok(())
    }

    async fn flush(&self, _lun: &LunInfo) -> Result<(), BackendError> {
        let mut g = self.lock();
        Self::write_fault(&g)?;
        g.flushes += 1;
        Ok(())
    }

    async fn unmap(&self, lun: &LunInfo, offset: u64, len: u64) -> Result<(), BackendError> {
        let mut g = self.lock();
        Self::write_fault(&g)?;
        Self::check(&g, lun, offset, len)?;
        Self::unmap_locked(&mut g, lun, offset, len);
        Ok(())
    }

    async fn write_zeroes(&self, lun: &LunInfo, offset: u64, len: u64) -> Result<(), BackendError> {
        let mut g = self.lock();
        Self::write_fault(&g)?;
        Self::check(&g, lun, offset, len)?;
        if lun.thin {
            Self::unmap_locked(&mut g, lun, offset, len);
        } else {
            let mut at = 0;
            while at < len {
                let n = (len - at).min(1 << 20);
                Self::write_locked(&mut g, lun, offset + at, &vec![0; n as usize]);
                at += n;
            }
        }
        Ok(())
    }

    async fn compare_and_write(
        &self,
        lun: &LunInfo,
        offset: u64,
        compare: Vec<u8>,
        write: Vec<u8>,
    ) -> Result<CompareOutcome, BackendError> {
        let mut g = self.lock();
        Self::write_fault(&g)?;
        Self::check(&g, lun, offset, compare.len() as u64)?;
        let current = Self::read_locked(&g, lun, offset, compare.len() as u64);
        if let Some(at) = current.iter().zip(&compare).position(|(a, b)| a != b) {
            return Ok(CompareOutcome::Miscompare { offset: at as u64 });
        }
        Self::write_locked(&mut g, lun, offset, &write);
        Ok(CompareOutcome::Written)
    }

    async fn reservations(&self, lun: &LunInfo) -> Result<PrState, BackendError> {
        let g = self.lock();
        if let Some(e) = g.faults.read.clone() {
            return Err(e);
        }
        Ok(g.reservations.get(&lun.uuid).cloned().unwrap_or_default())
    }

    async fn update_reservations(
        &self,
        lun: &LunInfo,
        expected: u64,
        new: PrState,
    ) -> Result<bool, BackendError> {
        let mut g = self.lock();
        Self::write_fault(&g)?;
        if g.faults.lost_races > 0 {
            g.faults.lost_races -= 1;
            return Ok(false);
        }
        let cur = g.reservations.get(&lun.uuid).map_or(0, |s| s.version);
        if cur != expected {
            return Ok(false);
        }
        g.reservations.insert(lun.uuid, new);
        Ok(true)
    }

    async fn set_write_protect(&self, lun: &LunInfo, on: bool) -> Result<(), BackendError> {
        let mut g = self.lock();
        Self::write_fault(&g)?;
        let mut found = false;
        for l in g.targets.values_mut().flatten() {
            if l.uuid == lun.uuid {
                l.write_protected = on;
                found = true;
            }
        }
        if !found {
            return Err(BackendError::OutOfRange);
        }
        g.generation += 1;
        Ok(())
    }

    async fn provisioning(
        &self,
        lun: &LunInfo,
        offset: u64,
        len: u64,
    ) -> Result<(Provisioning, u64), BackendError> {
        let g = self.lock();
        Self::check(&g, lun, offset, len)?;
        if !lun.thin {
            return Ok((Provisioning::Mapped, len));
        }
        let Some(d) = g.data.get(&lun.uuid) else {
            return Ok((Provisioning::Deallocated, len));
        };
        let bs = d.block_size;
        let first = offset / bs;
        let end = (offset + len).div_ceil(bs);
        let mapped = d.blocks.contains_key(&first);
        let mut blk = first + 1;
        while blk < end && d.blocks.contains_key(&blk) == mapped {
            blk += 1;
        }
        let status = if mapped {
            Provisioning::Mapped
        } else {
            Provisioning::Deallocated
        };
        Ok((
            status,
            ((blk - first) * bs - (offset - first * bs)).min(len),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BS: u64 = crate::backend::BLOCK_SIZE as u64;

    fn lun(thin: bool) -> LunInfo {
        LunInfo {
            block_size: crate::backend::BLOCK_SIZE,
            lun: 0,
            uuid: [7; 16],
            name: "d".into(),
            size_bytes: 64 * BS,
            thin,
            write_protected: false,
            write_fence: None,
        }
    }

    fn backend(thin: bool) -> MemBackend {
        let b = MemBackend::new();
        b.add_lun("t", lun(thin));
        b
    }

    #[tokio::test]
    async fn test_mem_write_read_unaligned_and_unmap() {
        let b = backend(true);
        let l = lun(true);
        b.write(&l, 100, vec![9; 5000], false).await.unwrap();
        let d = b.read(&l, 0, 2 * BS).await.unwrap();
        assert!(d[..100].iter().all(|&x| x == 0));
        assert!(d[100..5100].iter().all(|&x| x == 9));
        assert!(b.is_mapped(&l.uuid, 1));
        b.unmap(&l, 0, 2 * BS).await.unwrap();
        assert!(!b.is_mapped(&l.uuid, 0) && !b.is_mapped(&l.uuid, 1));
        assert!(b.read(&l, 0, 2 * BS).await.unwrap().iter().all(|&x| x == 0));
        assert_eq!(
            b.read(&l, 63 * BS, 2 * BS).await,
            Err(BackendError::OutOfRange)
        );
    }

    #[tokio::test]
    async fn test_mem_compare_and_write_atomic_and_miscompare() {
        let b = backend(false);
        let l = lun(false);
        let r = b
            .compare_and_write(&l, 0, vec![0; 4096], vec![1; 4096])
            .await
            .unwrap();
        assert_eq!(r, CompareOutcome::Written);
        let mut cmp = vec![1u8; 4096];
        cmp[10] = 2;
        let r = b
            .compare_and_write(&l, 0, cmp, vec![3; 4096])
            .await
            .unwrap();
        assert_eq!(r, CompareOutcome::Miscompare { offset: 10 });
        assert!(b.read(&l, 0, 4096).await.unwrap().iter().all(|&x| x == 1));
    }

    #[tokio::test]
    async fn test_mem_reservations_compare_and_set() {
        let b = backend(false);
        let l = lun(false);
        assert!(
            b.update_reservations(
                &l,
                0,
                PrState {
                    version: 1,
                    ..PrState::default()
                }
            )
            .await
            .unwrap()
        );
        assert!(
            !b.update_reservations(
                &l,
                0,
                PrState {
                    version: 2,
                    ..PrState::default()
                }
            )
            .await
            .unwrap()
        );
        b.set_faults(Faults {
            lost_races: 1,
            ..Faults::default()
        });
        assert!(
            !b.update_reservations(
                &l,
                1,
                PrState {
                    version: 2,
                    ..PrState::default()
                }
            )
            .await
            .unwrap()
        );
        assert!(
            b.update_reservations(
                &l,
                1,
                PrState {
                    version: 2,
                    ..PrState::default()
                }
            )
            .await
            .unwrap()
        );
        assert_eq!(b.reservations(&l).await.unwrap().version, 2);
    }

    #[tokio::test]
    async fn test_mem_provisioning_runs() {
        let b = backend(true);
        let l = lun(true);
        b.write(&l, 2 * BS, vec![1; 3 * BS as usize], false)
            .await
            .unwrap();
        assert_eq!(
            b.provisioning(&l, 0, 64 * BS).await.unwrap(),
            (Provisioning::Deallocated, 2 * BS)
        );
        assert_eq!(
            b.provisioning(&l, 2 * BS, 62 * BS).await.unwrap(),
            (Provisioning::Mapped, 3 * BS)
        );
        b.write_zeroes(&l, 3 * BS, BS).await.unwrap();
        assert_eq!(
            b.provisioning(&l, 2 * BS, 62 * BS).await.unwrap(),
            (Provisioning::Mapped, BS)
        );
    }

    #[tokio::test]
    async fn test_mem_faults_and_acl() {
        let b = backend(false);
        let l = lun(false);
        b.set_faults(Faults {
            read: Some(BackendError::Medium("bad".into())),
            ..Faults::default()
        });
        assert!(b.read(&l, 0, BS).await.is_err());
        b.set_faults(Faults {
            write: Some(BackendError::WriteProtected("ro".into())),
            ..Faults::default()
        });
        assert!(b.write(&l, 0, vec![0; 4096], false).await.is_err());
        b.set_acl("t", 0, Some(vec!["iqn.a".into()]));
        assert!(b.allows("t", &l, "iqn.a"));
        assert!(!b.allows("t", &l, "iqn.b"));
    }

    #[tokio::test]
    async fn test_mem_512_byte_blocks_map_and_unmap_per_logical_block() {
        let b = MemBackend::new();
        let l = b.create_lun("t", 0, 64, 512, true);
        assert_eq!(l.blocks(), 64);
        b.write(&l, 512, vec![5; 1024], false).await.unwrap();
        assert!(!b.is_mapped(&l.uuid, 0));
        assert!(b.is_mapped(&l.uuid, 1) && b.is_mapped(&l.uuid, 2));
        assert!(!b.is_mapped(&l.uuid, 3));
        assert_eq!(
            b.provisioning(&l, 0, 64 * 512).await.unwrap(),
            (Provisioning::Deallocated, 512)
        );
        assert_eq!(
            b.provisioning(&l, 512, 63 * 512).await.unwrap(),
            (Provisioning::Mapped, 1024)
        );
        // One 512-byte block is deallocated on its own.
        b.unmap(&l, 1024, 512).await.unwrap();
        assert!(b.is_mapped(&l.uuid, 1) && !b.is_mapped(&l.uuid, 2));
        let d = b.read(&l, 0, 2048).await.unwrap();
        assert!(d[..512].iter().all(|&x| x == 0));
        assert!(d[512..1024].iter().all(|&x| x == 5));
        assert!(d[1024..].iter().all(|&x| x == 0));
        assert_eq!(
            b.read(&l, 63 * 512, 1024).await,
            Err(BackendError::OutOfRange)
        );
    }

    #[test]
    fn test_mem_create_lun_distinct_uuids_and_block_size_checked() {
        let b = MemBackend::new();
        let a = b.create_lun("t", 0, 8, 4096, false);
        let c = b.create_lun("t", 1, 8, 512, false);
        let other = b.create_lun("u", 0, 8, 512, false);
        assert_ne!(a.uuid, c.uuid);
        assert_ne!(a.uuid, other.uuid);
        assert_eq!(b.luns("t").len(), 2);
        let bad = std::panic::catch_unwind(|| {
            MemBackend::new().add_lun(
                "t",
                LunInfo {
                    block_size: 1024,
                    ..a.clone()
                },
            )
        });
        assert!(bad.is_err());
    }

    #[tokio::test]
    async fn test_mem_set_write_protect_shows_in_every_target() {
        let b = MemBackend::new();
        let l = b.create_lun("t", 0, 8, 4096, false);
        assert!(!l.write_protected, "a new LUN is writable");
        b.add_lun("u", l.clone());
        let generation = b.luns_generation("t");
        b.set_write_protect(&l, true).await.unwrap();
        assert!(b.luns("t")[0].write_protected && b.luns("u")[0].write_protected);
        assert_ne!(b.luns_generation("t"), generation, "the LUN table changed");
        b.set_write_protect(&l, false).await.unwrap();
        assert!(!b.luns("t")[0].write_protected);
        let gone = LunInfo {
            uuid: [9; 16],
            ..l.clone()
        };
        assert_eq!(
            b.set_write_protect(&gone, true).await,
            Err(BackendError::OutOfRange)
        );
    }
}
