;; nap.wat — sleeps 1 s in poll_oneoff, then prints a valid response.
;;
;; Why: a request that is reliably still running a second after it arrived,
;; well inside the default timeout_ms, so a test can stop the server while the
;; request is in flight and see the graceful drain finish it with a 200.
;; (sleep.wat sleeps 5 s, past the default deadline, for the 504 case.)
;;
;; Output:  content-type: text/plain
;;          (blank line)
;;          rested
;;
;; Memory:  0..7 iovec {ptr, len}; 8..11 result count; 16.. the output;
;;          64..111 the clock subscription; 128..159 the event it produces.
(module
  (import "wasi_snapshot_preview1" "poll_oneoff"
    (func $poll_oneoff (param $in i32) (param $out i32) (param $nsubscriptions i32)
                       (param $nevents i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_write"
    (func $fd_write (param $fd i32) (param $iovs i32) (param $iovs_len i32)
                    (param $nwritten i32) (result i32)))

  (memory (export "memory") 1)

  (global $SUBSCRIPTION i32 (i32.const 64))
  (global $EVENT i32 (i32.const 128))
  (global $SLEEP_NS i64 (i64.const 1_000_000_000))
  (global $CLOCK_MONOTONIC i32 (i32.const 1))

  (data (i32.const 16) "content-type: text/plain\n\nrested\n")  ;; 33 bytes

  (func (export "_start")
    ;; subscription: userdata u64 @0; tag u8 @8 (0 = clock); clock id u32 @16;
    ;; timeout u64 @24; precision u64 @32; flags u16 @40 (0 = relative).
    ;; The rest of the page is zero already.
    (i64.store offset=24 (global.get $SUBSCRIPTION) (global.get $SLEEP_NS))
    (i32.store offset=16 (global.get $SUBSCRIPTION) (global.get $CLOCK_MONOTONIC))
    (drop (call $poll_oneoff (global.get $SUBSCRIPTION) (global.get $EVENT) (i32.const 1)
                             (i32.const 8)))
    (i32.store (i32.const 0) (i32.const 16))
    (i32.store (i32.const 4) (i32.const 33))
    (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))))
