//! The target's side of CHAP (RFC 7143 12.1.3, RFC 1994) with MD5, one-way and mutual.
//!
//! ```text
//! initiator                                   target
//! AuthMethod=CHAP,None              ->
//!                                   <-        AuthMethod=CHAP
//! CHAP_A=5                          ->
//!                                   <-        CHAP_A=5 CHAP_I=<id> CHAP_C=0x<challenge>
//! CHAP_N=<user> CHAP_R=0x<MD5(id|secret|challenge)>
//!   [CHAP_I=<id'> CHAP_C=<challenge'>]  ->    (checks name and response)
//!                                   <-        [CHAP_N=<target> CHAP_R=0x<MD5(id'|mutual secret|challenge'>)]
//! ```

use md5::{Digest, Md5};

use super::{ChapSecrets, FillRandom, LoginError};
use crate::text;

/// CHAP_A's value for MD5, the only algorithm RFC 7143 requires.
const CHAP_MD5: u64 = 5;
/// The length of the target's challenge: twice the MD5 output.
pub(super) const CHALLENGE_LEN: usize = 32;
/// The shortest initiator challenge accepted: the MD5 output length.
const MIN_CHALLENGE_LEN: usize = 16;
/// The longest initiator challenge accepted (RFC 7143 12.1.3).
const MAX_CHALLENGE_LEN: usize = 1024;

/// Where security negotiation stands.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(super) enum Auth {
    /// AuthMethod not negotiated yet.
    #[default]
    Start,
    /// AuthMethod=None: nothing to prove.
    MethodNone,
    /// AuthMethod=CHAP: waiting for CHAP_A.
    AwaitAlgorithm,
    /// The challenge is out: waiting for CHAP_N and CHAP_R.
    AwaitResponse {
        /// CHAP_I.
        id: u8,
        /// CHAP_C.
        challenge: Vec<u8>,
    },
    /// The initiator proved its secret as `user`.
    Authenticated {
        /// The CHAP name.
        user: String,
    },
}

impl Auth {
    /// Handles the security keys of one request, appending the target's keys to `out`.
    pub(super) fn process(
        &mut self,
        pairs: &[(String, String)],
        secrets: Option<&ChapSecrets>,
        random: FillRandom,
        out: &mut Vec<(String, String)>,
    ) -> Result<(), LoginError> {
        let get = |key: &str| {
            pairs
                .iter()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v.as_str())
        };
        let handled = [
            "AuthMethod",
            "CHAP_A",
            "CHAP_N",
            "CHAP_R",
            "CHAP_I",
            "CHAP_C",
        ];
        if let Some((key, _)) = pairs.iter().find(|(k, _)| !handled.contains(&k.as_str())) {
            // SRP, Kerberos and SPKM keys: those methods are never selected.
            return Err(LoginError::UnexpectedAuthKey(key.clone()));
        }

        if let Some(methods) = get("AuthMethod") {
            if *self != Auth::Start {
                return Err(LoginError::UnexpectedAuthKey("AuthMethod".into()));
            }
            let wanted = if secrets.is_some() { "CHAP" } else { "None" };
            if !text::list(methods).any(|m| m == wanted) {
                return Err(match secrets {
                    Some(_) => LoginError::ChapRequired,
                    None => LoginError::ChapNotConfigured,
                });
            }
            out.push(("AuthMethod".into(), wanted.into()));
            *self = if secrets.is_some() {
                Auth::AwaitAlgorithm
            } else {
                Auth::MethodNone
            };
        }

        if let Some(algorithms) = get("CHAP_A") {
            if *self != Auth::AwaitAlgorithm {
                return Err(LoginError::UnexpectedAuthKey("CHAP_A".into()));
            }
            if !text::list(algorithms).any(|a| text::parse_number(a) == Ok(CHAP_MD5)) {
                return Err(LoginError::UnsupportedChapAlgorithm(algorithms.to_string()));
            }
            let mut id = [0u8; 1];
            let mut challenge = vec![0u8; CHALLENGE_LEN];
            random(&mut id).map_err(|_| LoginError::RandomUnavailable)?;
            random(&mut challenge).map_err(|_| LoginError::RandomUnavailable)?;
            out.push(("CHAP_A".into(), CHAP_MD5.to_string()));
            out.push(("CHAP_I".into(), id[0].to_string()));
            out.push(("CHAP_C".into(), text::encode_hex(&challenge)));
            *self = Auth::AwaitResponse {
                id: id[0],
                challenge,
            };
        }

        let answer = ["CHAP_N", "CHAP_R", "CHAP_I", "CHAP_C"]
            .into_iter()
            .find(|k| get(k).is_some());
        if let Some(key) = answer {
            let (Auth::AwaitResponse { id, challenge }, Some(secrets)) = (&*self, secrets) else {
                return Err(LoginError::UnexpectedAuthKey(key.into()));
            };
            let user = verify(*id, challenge, secrets, get("CHAP_N"), get("CHAP_R"))?;
            if let Some((name, response)) =
                answer_mutual(challenge, secrets, get("CHAP_I"), get("CHAP_C"))?
            {
                out.push(("CHAP_N".into(), name));
                out.push(("CHAP_R".into(), response));
            }
            *self = Auth::Authenticated { user };
        }
        Ok(())
    }

    /// Whether security negotiation may end now. Without AuthMethod the default None
    /// applies, which a target requiring CHAP refuses; during the CHAP exchange the answer is
    /// not yet (the response keeps T=0).
    pub(super) fn ready_to_leave(&mut self, chap_required: bool) -> Result<bool, LoginError> {
        match self {
            Auth::Start if chap_required => Err(LoginError::ChapRequired),
            Auth::Start => {
                *self = Auth::MethodNone;
                Ok(true)
            }
            Auth::MethodNone | Auth::Authenticated { .. } => Ok(true),
            Auth::AwaitAlgorithm | Auth::AwaitResponse { .. } => Ok(false),
        }
    }

    /// The authenticated CHAP name.
    pub(super) fn user(&self) -> Option<&str> {
        match self {
            Auth::Authenticated { user } => Some(user),
            _ => None,
        }
    }
}

/// Checks the initiator's CHAP_N and CHAP_R against the challenge and the configured secret.
fn verify(
    id: u8,
    challenge: &[u8],
    secrets: &ChapSecrets,
    name: Option<&str>,
    response: Option<&str>,
) -> Result<String, LoginError> {
    let (Some(name), Some(response)) = (name, response) else {
        return Err(LoginError::ChapMissingResponse);
    };
    let response = text::decode_binary(response).map_err(|_| LoginError::ChapMalformedResponse)?;
    if response.len() != 16 {
        return Err(LoginError::ChapMalformedResponse);
    }
    let expected = chap_md5_response(id, &secrets.secret, challenge);
    // Both checks run whatever the first one says, so timing tells nothing about which failed.
    let name_ok = name == secrets.user;
    let response_ok = constant_time_eq(&response, &expected);
    if !name_ok {
        return Err(LoginError::ChapUnknownUser(name.to_string()));
    }
    if !response_ok {
        return Err(LoginError::ChapWrongResponse);
    }
    Ok(name.to_string())
}

/// Answers the initiator's own challenge (mutual CHAP): the target's CHAP_N and CHAP_R, or
/// `None` when the initiator did not ask.
fn answer_mutual(
    our_challenge: &[u8],
    secrets: &ChapSecrets,
    id: Option<&str>,
    challenge: Option<&str>,
) -> Result<Option<(String, String)>, LoginError> {
    let (id, challenge) = match (id, challenge) {
        (None, None) => return Ok(None),
        (Some(id), Some(challenge)) => (id, challenge),
        _ => return Err(LoginError::ChapIncompleteChallenge),
    };
    let Some((name, secret)) = &secrets.mutual else {
        return Err(LoginError::MutualChapNotConfigured);
    };
    let id = text::parse_number(id)
        .ok()
        .and_then(|n| u8::try_from(n).ok())
        .ok_or_else(|| LoginError::ChapBadIdentifier(id.to_string()))?;
    let challenge = text::decode_binary(challenge).map_err(|_| LoginError::ChapBadChallenge)?;
    if !(MIN_CHALLENGE_LEN..=MAX_CHALLENGE_LEN).contains(&challenge.len()) {
        return Err(LoginError::ChapBadChallenge);
    }
    // Answering our own challenge would hand an impostor the response it needs.
    if challenge == our_challenge {
        return Err(LoginError::ChapReflected);
    }
    // RFC 7143 12.1.3: a secret authenticating initiators must not authenticate targets.
    if constant_time_eq(secret, &secrets.secret) {
        return Err(LoginError::ChapSecretReused);
    }
    let response = chap_md5_response(id, secret, &challenge);
    Ok(Some((name.clone(), text::encode_hex(&response))))
}

/// The CHAP response with MD5 (RFC 1994): MD5 over the identifier, the secret and the
/// challenge.
///
/// ```
/// use csvd_iscsi_target::login::chap_md5_response;
/// assert_eq!(chap_md5_response(1, b"secret", b"challenge").len(), 16);
/// ```
pub fn chap_md5_response(id: u8, secret: &[u8], challenge: &[u8]) -> [u8; 16] {
    let mut md5 = Md5::new();
    md5.update([id]);
    md5.update(secret);
    md5.update(challenge);
    md5.finalize().into()
}

/// Compares two byte strings in time that depends on their lengths only.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_chap_md5_response_matches_rfc1994_construction() {
        // MD5 of 0x01 || "secret" || 0x00..0x0f, computed by hand with the md5 digest.
        let challenge: Vec<u8> = (0..16).collect();
        let mut data = vec![1u8];
        data.extend_from_slice(b"secret");
        data.extend_from_slice(&challenge);
        let expected: [u8; 16] = Md5::digest(&data).into();
        assert_eq!(chap_md5_response(1, b"secret", &challenge), expected);
        assert_ne!(chap_md5_response(2, b"secret", &challenge), expected);
    }

    #[test]
    fn test_constant_time_eq_compares_contents_and_lengths() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
        assert!(constant_time_eq(b"", b""));
    }

    #[test]
    fn test_auth_ready_to_leave() {
        assert_eq!(
            Auth::Start.ready_to_leave(true),
            Err(LoginError::ChapRequired)
        );
        let mut auth = Auth::Start;
        assert_eq!(auth.ready_to_leave(false), Ok(true));
        assert_eq!(auth, Auth::MethodNone);
        assert_eq!(Auth::AwaitAlgorithm.ready_to_leave(true), Ok(false));
        let mut done = Auth::Authenticated { user: "u".into() };
        assert_eq!(done.ready_to_leave(true), Ok(true));
        assert_eq!(done.user(), Some("u"));
    }
}
