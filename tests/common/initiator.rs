//! A small iSCSI initiator for tests that need what libiscsi's tools cannot do from a shell:
//! several sessions at once, persistent reservations, task management, hand-made bad PDUs.
//! It speaks the wire protocol with the target crate's codec; the real initiators (libiscsi's
//! tools, QEMU) are used wherever they can express the test.
#![allow(dead_code)]

use std::time::Duration;

use csvd_iscsi_target::pdu::{self, BHS_LEN, Bhs, Framing, RESERVED_TAG, op};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The outcome of one SCSI command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScsiResult {
    pub status: u8,
    /// Fixed-format sense data, when the status carried any.
    pub sense: Vec<u8>,
    pub data: Vec<u8>,
}

impl ScsiResult {
    /// (sense key, ASC, ASCQ) of the sense data, if any.
    pub fn sense_code(&self) -> Option<(u8, u8, u8)> {
        (self.sense.len() >= 14).then(|| (self.sense[2] & 0x0f, self.sense[12], self.sense[13]))
    }
}

/// A received PDU.
#[derive(Debug, Clone)]
pub struct Received {
    pub bhs: Bhs,
    pub data: Vec<u8>,
}

pub struct Initiator {
    stream: TcpStream,
    pub framing: Framing,
    itt: u32,
    cmd_sn: u32,
    exp_stat_sn: u32,
    /// The target's MaxRecvDataSegmentLength.
    pub max_xmit: u32,
    pub name: String,
    pub isid: [u8; 6],
    /// Keys of the final login response.
    pub login_keys: Vec<(String, String)>,
}

fn keys(data: &[u8]) -> Vec<(String, String)> {
    data.split(|b| *b == 0)
        .filter(|s| !s.is_empty())
        .filter_map(|s| {
            let s = String::from_utf8_lossy(s);
            s.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
        })
        .collect()
}

fn encode_keys(pairs: &[(&str, &str)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (k, v) in pairs {
        out.extend_from_slice(format!("{k}={v}").as_bytes());
        out.push(0);
    }
    out
}

impl Initiator {
    /// Logs in with one operational-stage request. `target` None: a discovery session.
    /// Err carries the login status (class, detail).
    pub async fn login(
        addr: &str,
        name: &str,
        isid: [u8; 6],
        target: Option<&str>,
        extra: &[(&str, &str)],
    ) -> Result<Initiator, (u8, u8)> {
        let stream = TcpStream::connect(addr)
            .await
            .expect("connect to the portal");
        stream.set_nodelay(true).unwrap();
        let mut me = Initiator {
            stream,
            framing: Framing::login(),
            itt: 0x100,
            cmd_sn: 1,
            exp_stat_sn: 0,
            max_xmit: 8192,
            name: name.into(),
            isid,
            login_keys: Vec::new(),
        };
        let mut pairs: Vec<(&str, &str)> = vec![("InitiatorName", name)];
        match target {
            Some(t) => pairs.extend([("SessionType", "Normal"), ("TargetName", t)]),
            None => pairs.push(("SessionType", "Discovery")),
        }
        let defaults = [
            ("HeaderDigest", "None"),
            ("DataDigest", "None"),
            ("MaxRecvDataSegmentLength", "262144"),
            ("InitialR2T", "No"),
            ("ImmediateData", "Yes"),
            ("MaxBurstLength", "1048576"),
            ("FirstBurstLength", "65536"),
            ("MaxOutstandingR2T", "1"),
            ("ErrorRecoveryLevel", "0"),
            ("MaxConnections", "1"),
        ];
        for (k, v) in defaults {
            if !extra.iter().any(|(ek, _)| *ek == k) {
                pairs.push((k, v));
            }
        }
        pairs.extend_from_slice(extra);
        let data = encode_keys(&pairs);
        let mut b = Bhs::new(op::LOGIN);
        b.0[0] |= 0x40;
        b.0[1] = 0x80 | (1 << 2) | 3; // T, CSG=1, NSG=3
        b.0[8..14].copy_from_slice(&isid);
        b.put_u32(16, me.next_itt());
        b.put_u32(24, me.cmd_sn);
        me.send(&b, &data).await;
        let r = me.recv().await.expect("a login response");
        assert_eq!(r.bhs.opcode(), op::LOGIN_RESPONSE);
        let (class, detail) = (r.bhs.0[36], r.bhs.0[37]);
        if class != 0 {
            return Err((class, detail));
        }
        assert!(r.bhs.0[1] & 0x80 != 0, "the login completes in one step");
        me.exp_stat_sn = r.bhs.u32_at(24).wrapping_add(1);
        me.login_keys = keys(&r.data);
        let get = |k: &str| {
            me.login_keys
                .iter()
                .find(|(key, _)| key == k)
                .map(|(_, v)| v.clone())
        };
        if let Some(v) = get("MaxRecvDataSegmentLength") {
            me.max_xmit = v.parse().unwrap();
        }
        me.framing = Framing {
            header_digest: get("HeaderDigest").as_deref() == Some("CRC32C"),
            data_digest: get("DataDigest").as_deref() == Some("CRC32C"),
            max_recv_data: 262_144,
        };
        Ok(me)
    }

    /// Takes the next CmdSN (for hand-made commands).
    pub fn next_cmd_sn(&mut self) -> u32 {
        let sn = self.cmd_sn;
        self.cmd_sn = self.cmd_sn.wrapping_add(1);
        sn
    }

    fn next_itt(&mut self) -> u32 {
        self.itt += 1;
        self.itt
    }

    pub async fn send(&mut self, bhs: &Bhs, data: &[u8]) {
        let mut out = Vec::new();
        self.framing.encode_into(bhs, data, &mut out);
        self.stream.write_all(&out).await.expect("send");
    }

    /// Sends raw bytes (for malformed PDUs).
    pub async fn send_raw(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(bytes).await
    }

    /// The next PDU, or None when the target closed the connection (or 10 s passed).
    pub async fn recv(&mut self) -> Option<Received> {
        let read = async {
            let mut b = [0u8; BHS_LEN];
            self.stream.read_exact(&mut b).await.ok()?;
            let bhs = Bhs(b);
            let mut rest =
                vec![0u8; self.framing.header_rest_len(&bhs) + self.framing.data_wire_len(&bhs)];
            self.stream.read_exact(&mut rest).await.ok()?;
            let hd = if self.framing.header_digest { 4 } else { 0 };
            let start = bhs.ahs_len() + hd;
            let data = rest[start..start + bhs.data_len() as usize].to_vec();
            Some(Received { bhs, data })
        };
        tokio::time::timeout(Duration::from_secs(10), read)
            .await
            .ok()
            .flatten()
    }

    /// Runs one command: sends immediate data up to the first burst, answers R2Ts, collects
    /// Data-In. `read_len` is the Expected Data Transfer Length for a read.
    pub async fn command(
        &mut self,
        lun: u64,
        cdb: &[u8],
        data_out: &[u8],
        read_len: u32,
    ) -> ScsiResult {
        let itt = self.next_itt();
        let mut b = Bhs::new(op::SCSI_COMMAND);
        let write = !data_out.is_empty();
        let immediate = data_out.len().min(65536).min(self.max_xmit as usize);
        b.0[1] = 0x01; // simple task
        if write {
            b.0[1] |= 0x20;
        }
        if read_len > 0 {
            b.0[1] |= 0x40;
        }
        // Only immediate data, the rest by R2T: F=1.
        b.0[1] |= 0x80;
        b.0[8..16].copy_from_slice(&pdu::encode_lun(lun));
        b.put_u32(16, itt);
        b.put_u32(
            20,
            if write {
                data_out.len() as u32
            } else {
                read_len
            },
        );
        b.put_u32(24, self.cmd_sn);
        b.put_u32(28, self.exp_stat_sn);
        self.cmd_sn = self.cmd_sn.wrapping_add(1);
        b.0[32..32 + cdb.len().min(16)].copy_from_slice(&cdb[..cdb.len().min(16)]);
        self.send(&b, &data_out[..immediate]).await;
        let mut data = Vec::new();
        loop {
            let r = self.recv().await.expect("a response");
            match r.bhs.opcode() {
                op::R2T => {
                    let ttt = r.bhs.u32_at(20);
                    let offset = r.bhs.u32_at(40) as usize;
                    let len = r.bhs.u32_at(44) as usize;
                    let mut sent = 0;
                    let mut data_sn = 0;
                    while sent < len {
                        let n = (len - sent).min(self.max_xmit as usize);
                        let mut d = Bhs::new(op::DATA_OUT);
                        if sent + n == len {
                            d.0[1] = 0x80;
                        }
                        d.0[8..16].copy_from_slice(&pdu::encode_lun(lun));
                        d.put_u32(16, itt);
                        d.put_u32(20, ttt);
                        d.put_u32(28, self.exp_stat_sn);
                        d.put_u32(36, data_sn);
                        d.put_u32(40, (offset + sent) as u32);
                        let chunk = data_out[offset + sent..offset + sent + n].to_vec();
                        self.send(&d, &chunk).await;
                        sent += n;
                        data_sn += 1;
                    }
                }
                op::DATA_IN => {
                    data.extend_from_slice(&r.data);
                    if r.bhs.0[1] & 0x01 != 0 {
                        self.exp_stat_sn = r.bhs.u32_at(24).wrapping_add(1);
                        return ScsiResult {
                            status: r.bhs.0[3],
                            sense: Vec::new(),
                            data,
                        };
                    }
                }
                op::SCSI_RESPONSE => {
                    self.exp_stat_sn = r.bhs.u32_at(24).wrapping_add(1);
                    let sense = if r.data.len() >= 2 {
                        let n = u16::from_be_bytes([r.data[0], r.data[1]]) as usize;
                        r.data[2..2 + n.min(r.data.len() - 2)].to_vec()
                    } else {
                        Vec::new()
                    };
                    return ScsiResult {
                        status: r.bhs.0[3],
                        sense,
                        data,
                    };
                }
                op::NOP_IN => {}
                other => panic!("unexpected opcode {other:#x} during a command"),
            }
        }
    }

    /// A Text request; returns the response's key=value pairs (following continuations).
    pub async fn text(&mut self, pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        let itt = self.next_itt();
        let mut ttt = RESERVED_TAG;
        let mut data = encode_keys(pairs);
        let mut all = Vec::new();
        loop {
            let mut b = Bhs::new(op::TEXT);
            b.0[0] |= 0x40;
            b.0[1] = 0x80;
            b.put_u32(16, itt);
            b.put_u32(20, ttt);
            b.put_u32(24, self.cmd_sn);
            b.put_u32(28, self.exp_stat_sn);
            self.send(&b, &data).await;
            data.clear();
            let r = self.recv().await.expect("a text response");
            assert_eq!(r.bhs.opcode(), op::TEXT_RESPONSE);
            self.exp_stat_sn = r.bhs.u32_at(24).wrapping_add(1);
            all.extend_from_slice(&r.data);
            if r.bhs.0[1] & 0x40 == 0 {
                return keys(&all);
            }
            ttt = r.bhs.u32_at(20);
        }
    }

    /// A task management request; returns the response code.
    pub async fn task_mgmt(&mut self, function: u8, lun: u64, rtt: u32) -> u8 {
        let itt = self.next_itt();
        let mut b = Bhs::new(op::TASK_MGMT);
        b.0[0] |= 0x40;
        b.0[1] = 0x80 | function;
        b.0[8..16].copy_from_slice(&pdu::encode_lun(lun));
        b.put_u32(16, itt);
        b.put_u32(20, rtt);
        b.put_u32(24, self.cmd_sn);
        b.put_u32(28, self.exp_stat_sn);
        self.send(&b, &[]).await;
        loop {
            let r = self.recv().await.expect("a task management response");
            if r.bhs.opcode() == op::TASK_MGMT_RESPONSE {
                self.exp_stat_sn = r.bhs.u32_at(24).wrapping_add(1);
                return r.bhs.0[2];
            }
        }
    }

    /// Logs out (closing the session); returns the logout response code.
    pub async fn logout(mut self) -> u8 {
        let itt = self.next_itt();
        let mut b = Bhs::new(op::LOGOUT);
        b.0[0] |= 0x40;
        b.0[1] = 0x80;
        b.put_u32(16, itt);
        b.put_u32(24, self.cmd_sn);
        b.put_u32(28, self.exp_stat_sn);
        self.send(&b, &[]).await;
        loop {
            let r = self.recv().await.expect("a logout response");
            if r.bhs.opcode() == op::LOGOUT_RESPONSE {
                return r.bhs.0[2];
            }
        }
    }
}

/// CDB builders.
pub mod cdb {
    /// WRITE(16).
    pub fn write16(lba: u64, blocks: u32) -> Vec<u8> {
        let mut c = vec![0u8; 16];
        c[0] = 0x8a;
        c[2..10].copy_from_slice(&lba.to_be_bytes());
        c[10..14].copy_from_slice(&blocks.to_be_bytes());
        c
    }
    /// READ(16).
    pub fn read16(lba: u64, blocks: u32) -> Vec<u8> {
        let mut c = write16(lba, blocks);
        c[0] = 0x88;
        c
    }
    /// PERSISTENT RESERVE OUT with a 24-byte parameter list.
    pub fn prout(action: u8, kind: u8) -> Vec<u8> {
        let mut c = vec![0u8; 10];
        c[0] = 0x5f;
        c[1] = action;
        c[2] = kind;
        c[8] = 24;
        c
    }
    /// The PR OUT parameter list.
    pub fn prout_params(key: u64, sa_key: u64, all_tg_pt: bool) -> Vec<u8> {
        let mut p = vec![0u8; 24];
        p[0..8].copy_from_slice(&key.to_be_bytes());
        p[8..16].copy_from_slice(&sa_key.to_be_bytes());
        if all_tg_pt {
            p[20] = 0x04;
        }
        p
    }
    /// PERSISTENT RESERVE IN, READ KEYS.
    pub fn prin_read_keys() -> Vec<u8> {
        let mut c = vec![0u8; 10];
        c[0] = 0x5e;
        c[7] = 0x02; // allocation length 512
        c
    }
}
