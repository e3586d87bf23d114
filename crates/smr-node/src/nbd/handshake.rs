//! Fixed-newstyle negotiation: greeting, client flags, option haggling.

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::export::Export;
use super::proto::*;
use super::{NbdError, Result};

/// Options a client may send before we consider it abusive.
const MAX_OPTIONS: usize = 1024;

/// What negotiation settled on; input of the transmission phase.
#[derive(Debug, Clone)]
pub(crate) struct Session {
    /// The export selected by `NBD_OPT_GO` or `NBD_OPT_EXPORT_NAME`.
    pub export: Export,
    /// Structured replies negotiated.
    pub structured: bool,
    /// `base:allocation` selected for this export.
    pub block_status: bool,
}

/// Result of a successful negotiation.
pub(crate) enum Outcome {
    /// Enter transmission with this session.
    Transmission(Session),
    /// The client aborted (`NBD_OPT_ABORT`) or hung up between options.
    Closed,
}

/// Transmission flags for `export`.
pub(crate) fn transmission_flags(export: &Export, structured: bool) -> u16 {
    let mut flags = TFLAG_HAS_FLAGS | TFLAG_SEND_FLUSH | TFLAG_SEND_CACHE;
    if export.device.read_only() {
        flags |= TFLAG_READ_ONLY | TFLAG_CAN_MULTI_CONN;
    } else {
        flags |= TFLAG_SEND_FUA | TFLAG_SEND_TRIM | TFLAG_SEND_WRITE_ZEROES | TFLAG_SEND_FAST_ZERO;
    }
    if structured {
        flags |= TFLAG_SEND_DF;
    }
    flags
}

/// Index of the export called `name`; the empty name is the first export.
fn find_export(exports: &[Export], name: &[u8]) -> Option<usize> {
    if name.is_empty() {
        return if exports.is_empty() { None } else { Some(0) };
    }
    exports.iter().position(|e| e.name.as_bytes() == name)
}

fn lossy(name: &[u8]) -> String {
    String::from_utf8_lossy(&name[..name.len().min(256)]).into_owned()
}

struct Negotiation<'a, R, W> {
    reader: &'a mut R,
    writer: &'a mut W,
    exports: &'a [Export],
    structured: bool,
    no_zeroes: bool,
    /// Export for which `base:allocation` was selected, if any.
    meta_export: Option<usize>,
}

/// Run the handshake on a fresh connection.
pub(crate) async fn negotiate<R, W>(
    reader: &mut R,
    writer: &mut W,
    exports: &[Export],
) -> Result<Outcome>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut greeting = [0u8; 18];
    greeting[..8].copy_from_slice(&NBD_MAGIC.to_be_bytes());
    greeting[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    greeting[16..].copy_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    writer.write_all(&greeting).await?;
    writer.flush().await?;

    let client_flags = reader.read_u32().await?;
    if client_flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
        return Err(NbdError::UnknownClientFlags(client_flags));
    }
    let mut n = Negotiation {
        reader,
        writer,
        exports,
        structured: false,
        no_zeroes: client_flags & FLAG_C_NO_ZEROES != 0,
        meta_export: None,
    };
    for _ in 0..MAX_OPTIONS {
        if let Some(outcome) = n.option().await? {
            return Ok(outcome);
        }
    }
    Err(NbdError::TooManyOptions)
}

impl<R: AsyncRead + Unpin, W: AsyncWrite + Unpin> Negotiation<'_, R, W> {
    async fn reply(&mut self, option: u32, reply: u32, data: &[u8]) -> Result<()> {
        self.writer
            .write_all(&option_reply(option, reply, data))
            .await?;
        Ok(())
    }

    async fn error(&mut self, option: u32, reply: u32, message: &str) -> Result<()> {
        tracing::debug!(option, reply, message, "NBD option refused");
        self.reply(option, reply, message.as_bytes()).await
    }

    /// Handle one option; `Some` ends the negotiation.
    async fn option(&mut self) -> Result<Option<Outcome>> {
        let mut head = [0u8; OPTION_HEADER_LEN];
        match self.reader.read_exact(&mut head).await {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                return Ok(Some(Outcome::Closed))
            }
            Err(e) => return Err(e.into()),
        }
        let OptionHeader { option, len } = OptionHeader::parse(&head)?;
        if len > MAX_OPTION_LEN {
            // Not worth reading: refuse and hang up (the spec allows a
            // hard disconnect for what looks like denial of service).
            if option != OPT_EXPORT_NAME {
                self.error(option, REP_ERR_TOO_BIG, "option data too large")
                    .await?;
                self.writer.flush().await?;
            }
            return Err(NbdError::OptionTooLarge { option, len });
        }
        // Bounded by MAX_OPTION_LEN above.
        let mut data = vec![0u8; len as usize];
        self.reader.read_exact(&mut data).await?;
        let outcome = self.dispatch(option, &data).await?;
        self.writer.flush().await?;
        Ok(outcome)
    }

    async fn dispatch(&mut self, option: u32, data: &[u8]) -> Result<Option<Outcome>> {
        match option {
            OPT_EXPORT_NAME => return self.export_name(data).await.map(Some),
            OPT_ABORT => {
                // The client may already be gone; that is fine.
                let _ = self.reply(option, REP_ACK, &[]).await;
                return Ok(Some(Outcome::Closed));
            }
            OPT_LIST if !data.is_empty() => {
                self.error(option, REP_ERR_INVALID, "LIST takes no data")
                    .await?
            }
            OPT_LIST => {
                for e in self.exports {
                    let mut d = Vec::with_capacity(4 + e.name.len() + e.description.len());
                    d.extend_from_slice(&(e.name.len() as u32).to_be_bytes());
                    d.extend_from_slice(e.name.as_bytes());
                    d.extend_from_slice(e.description.as_bytes());
                    self.reply(option, REP_SERVER, &d).await?;
                }
                self.reply(option, REP_ACK, &[]).await?;
            }
            OPT_STARTTLS => {
                self.error(option, REP_ERR_POLICY, "TLS is not offered")
                    .await?
            }
            OPT_INFO | OPT_GO => return self.info(option, data).await,
            OPT_STRUCTURED_REPLY if !data.is_empty() => {
                self.error(option, REP_ERR_INVALID, "STRUCTURED_REPLY takes no data")
                    .await?
            }
            OPT_STRUCTURED_REPLY => {
                self.structured = true;
                self.reply(option, REP_ACK, &[]).await?;
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => self.meta_context(option, data).await?,
            _ => self.error(option, REP_ERR_UNSUP, "unknown option").await?,
        }
        Ok(None)
    }

    async fn export_name(&mut self, name: &[u8]) -> Result<Outcome> {
        let Some(i) = find_export(self.exports, name) else {
            // This option cannot be answered with an error: hang up.
            return Err(NbdError::UnknownExport(lossy(name)));
        };
        let export = &self.exports[i];
        let mut reply = Vec::with_capacity(10 + 124);
        reply.extend_from_slice(&export.device.size().to_be_bytes());
        reply.extend_from_slice(&transmission_flags(export, self.structured).to_be_bytes());
        if !self.no_zeroes {
            reply.resize(10 + 124, 0);
        }
        self.writer.write_all(&reply).await?;
        Ok(Outcome::Transmission(self.session(i)))
    }

    fn session(&self, i: usize) -> Session {
        Session {
            export: self.exports[i].clone(),
            structured: self.structured,
            block_status: self.structured && self.meta_export == Some(i),
        }
    }

    async fn info(&mut self, option: u32, data: &[u8]) -> Result<Option<Outcome>> {
        let Ok(req) = parse_info_request(data) else {
            self.error(option, REP_ERR_INVALID, "malformed INFO/GO data")
                .await?;
            return Ok(None);
        };
        let Some(i) = find_export(self.exports, req.name) else {
            self.error(option, REP_ERR_UNKNOWN, "no such export")
                .await?;
            return Ok(None);
        };
        let export = &self.exports[i];
        let mut d = Vec::with_capacity(12);
        d.extend_from_slice(&INFO_EXPORT.to_be_bytes());
        d.extend_from_slice(&export.device.size().to_be_bytes());
        d.extend_from_slice(&transmission_flags(export, self.structured).to_be_bytes());
        let mut replies = vec![d];
        // Block sizes are sent unasked: they are the defaults, so a client
        // that ignores them is still correct.
        let mut d = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
        for v in [MIN_BLOCK_SIZE, PREFERRED_BLOCK_SIZE, MAX_BLOCK_SIZE] {
            d.extend_from_slice(&v.to_be_bytes());
        }
        replies.push(d);
        if req.items.contains(&INFO_NAME) {
            let mut d = INFO_NAME.to_be_bytes().to_vec();
            d.extend_from_slice(export.name.as_bytes());
            replies.push(d);
        }
        if req.items.contains(&INFO_DESCRIPTION) && !export.description.is_empty() {
            let mut d = INFO_DESCRIPTION.to_be_bytes().to_vec();
            d.extend_from_slice(export.description.as_bytes());
            replies.push(d);
        }
        for d in replies {
            self.reply(option, REP_INFO, &d).await?;
        }
        self.reply(option, REP_ACK, &[]).await?;
        if option == OPT_GO {
            return Ok(Some(Outcome::Transmission(self.session(i))));
        }
        Ok(None)
    }

    async fn meta_context(&mut self, option: u32, data: &[u8]) -> Result<()> {
        let set = option == OPT_SET_META_CONTEXT;
        if set {
            // SET replaces the selection even when it fails.
            self.meta_export = None;
        }
        if !self.structured {
            return self
                .error(
                    option,
                    REP_ERR_INVALID,
                    "negotiate structured replies first",
                )
                .await;
        }
        let Ok(req) = parse_meta_context_request(data) else {
            return self
                .error(option, REP_ERR_INVALID, "malformed meta context data")
                .await;
        };
        let Some(i) = find_export(self.exports, req.name) else {
            return self.error(option, REP_ERR_UNKNOWN, "no such export").await;
        };
        let selected = if set {
            req.queries
                .iter()
                .any(|q| query_selects_base_allocation(q, false))
        } else {
            req.queries.is_empty()
                || req
                    .queries
                    .iter()
                    .any(|q| query_selects_base_allocation(q, true))
        };
        if selected {
            let id = if set { BASE_ALLOCATION_ID } else { 0 };
            let mut d = id.to_be_bytes().to_vec();
            d.extend_from_slice(BASE_ALLOCATION);
            self.reply(option, REP_META_CONTEXT, &d).await?;
            if set {
                self.meta_export = Some(i);
            }
        }
        self.reply(option, REP_ACK, &[]).await
    }
}
