//! Property test of the control socket's request reader: whatever a client sends, the request
//! is carried out exactly when its first line (within `MAX_REQUEST` bytes) is a request, and
//! refused with a reason otherwise; nothing else reaches the event loop.

use tokio::{io::AsyncWriteExt as _, net::UnixStream, sync::mpsc};

use super::{answer, Command, ControlReply, ControlRequest, MAX_REQUEST};
use crate::property::{assert_covered, bytes, cases, pick};

type Rng = fastrand::Rng;

/// What the reader must make of `input`: the request of its first line, if that line is
/// whole within `MAX_REQUEST` bytes, UTF-8 and a request.
fn expected(input: &[u8]) -> Option<ControlRequest> {
    let limited = &input[..input.len().min(MAX_REQUEST as usize)];
    let end = limited.iter().position(|b| *b == b'\n')?;
    let line = std::str::from_utf8(&limited[..=end]).ok()?;
    serde_json::from_str(line).ok()
}

fn gen_vip(rng: &mut Rng) -> Option<String> {
    let len = *pick(rng, &[0, 3, 40, 5_000]);
    rng.bool().then(|| {
        (0..rng.usize(..=len))
            .map(|_| *pick(rng, &['a', 'Z', '"', '\\', '\n', 'é', '\u{0}', '{']))
            .collect()
    })
}

/// A request as a client writes it, or something like one.
fn gen_input(rng: &mut Rng) -> Vec<u8> {
    let request = match rng.u8(..3) {
        0 => ControlRequest::Reload,
        1 => ControlRequest::Withdraw { vip: gen_vip(rng) },
        _ => ControlRequest::Announce { vip: gen_vip(rng) },
    };
    let mut line = serde_json::to_string(&request).unwrap();
    match rng.u8(..10) {
        0 => line = line.replace("\"command\"", "\"Command\""),
        1 => line = line.replace(':', " : "),
        2 => line.insert_str(line.len() - 1, ",\"extra\":[1,{}]"),
        3 => line = line.to_uppercase(),
        4 => line = format!("{line}{line}"),
        5 => {
            line = pick(
                rng,
                &["", "{}", "null", "[]", "\"reload\"", "{\"command\":1}"],
            )
            .to_string()
        }
        _ => {}
    }
    let mut input = line.into_bytes();
    match rng.u8(..6) {
        0 => {}
        1 => {
            let at = rng.usize(..=input.len());
            let len = rng.usize(1..=4);
            input.splice(at..at, bytes(rng, len));
            input.push(b'\n');
        }
        2 => {
            let len = rng.usize(..=6_000);
            input = bytes(rng, len);
        }
        _ => {
            input.push(b'\n');
            let len = rng.usize(..=40);
            input.extend(bytes(rng, len));
        }
    }
    input
}

/// Any bytes: the first line's request reaches the event loop and its reply comes back, or
/// the client is told why not, and nothing reaches the loop.
#[tokio::test]
async fn a_request_is_carried_out_only_when_its_line_is_one() {
    let (mut carried, mut refused) = (0, 0);
    for mut case in cases("a_request_is_carried_out_only_when_its_line_is_one", 256) {
        let input = gen_input(&mut case.rng);
        let (mut client, mut server) = UnixStream::pair().unwrap();
        let (commands, mut inbox) = mpsc::channel::<Command>(4);
        let event_loop = tokio::spawn(async move {
            let mut received = Vec::new();
            while let Some(command) = inbox.recv().await {
                received.push(command.request.clone());
                let message = format!("{:?}", command.request);
                let _ = command.reply.send(ControlReply::Done { message });
            }
            received
        });
        let writer = tokio::spawn(async move {
            // The reader may stop before the end: a failed write is fine.
            let _ = client.write_all(&input).await;
            let _ = client.shutdown().await;
            input
        });
        let reply = answer(&mut server, commands).await;
        let received = event_loop.await.unwrap();
        let input = writer.await.unwrap();
        let shown = String::from_utf8_lossy(&input);
        match expected(&input) {
            Some(request) => {
                let message = format!("{request:?}");
                assert_eq!(received, [request], "{shown:?}");
                assert_eq!(reply, ControlReply::Done { message });
                carried += 1;
            }
            None => {
                assert!(received.is_empty(), "{shown:?}: {received:?}");
                let ControlReply::Failed { error } = &reply else {
                    panic!("{shown:?}: {reply:?}");
                };
                let reasons = [
                    "a request is one line",
                    "reading the request",
                    "not a request",
                ];
                assert!(reasons.iter().any(|r| error.starts_with(r)), "{error}");
                refused += 1;
            }
        }
    }
    let what = format!("requests carried out ({carried}) and refused ({refused})");
    assert_covered(carried > 50 && refused > 50, &what);
}
