;; routes_sleepy.wat — `_routes` sleeps 2 s in poll_oneoff, then declares /a.
;;
;; Why: guest code on another worker's request path. Before `_routes` was run
;; once and stored, every worker of the pod ran it again when it caught up with
;; the upload, and its requests (every tenant's) waited those 2 s.
;;
;; Output of _routes:  "/a alt_a\n" (after 2 s)
;; Output of _start:   content-type: text/plain, blank line, "sleepy\n"
;; Output of alt_a:    content-type: text/plain, blank line, "sleepy a\n"
;;
;; Memory:  0..7 iovec {ptr, len}; 8..11 result count; 16.. the outputs;
;;          256..303 the clock subscription; 320..351 the event it produces.
(module
  (import "wasi_snapshot_preview1" "poll_oneoff"
    (func $poll_oneoff (param $in i32) (param $out i32) (param $nsubscriptions i32)
                       (param $nevents i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_write"
    (func $fd_write (param $fd i32) (param $iovs i32) (param $iovs_len i32)
                    (param $nwritten i32) (result i32)))

  (memory (export "memory") 1)

  (global $SUBSCRIPTION i32 (i32.const 256))
  (global $EVENT i32 (i32.const 320))
  (global $SLEEP_NS i64 (i64.const 2_000_000_000))
  (global $CLOCK_MONOTONIC i32 (i32.const 1))

  (data (i32.const 16) "/a alt_a\n")                                 ;; 9 bytes
  (data (i32.const 32) "content-type: text/plain\n\nsleepy\n")       ;; 33 bytes
  (data (i32.const 96) "content-type: text/plain\n\nsleepy a\n")     ;; 35 bytes

  (func $print (param $ptr i32) (param $len i32)
    (i32.store (i32.const 0) (local.get $ptr))
    (i32.store (i32.const 4) (local.get $len))
    (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8))))

  (func (export "_routes")
    ;; subscription: userdata u64 @0; tag u8 @8 (0 = clock); clock id u32 @16;
    ;; timeout u64 @24; precision u64 @32; flags u16 @40 (0 = relative).
    (i64.store offset=24 (global.get $SUBSCRIPTION) (global.get $SLEEP_NS))
    (i32.store offset=16 (global.get $SUBSCRIPTION) (global.get $CLOCK_MONOTONIC))
    (drop (call $poll_oneoff (global.get $SUBSCRIPTION) (global.get $EVENT) (i32.const 1)
                             (i32.const 8)))
    (call $print (i32.const 16) (i32.const 9)))

  (func (export "_start")
    (call $print (i32.const 32) (i32.const 33)))

  (func (export "alt_a")
    (call $print (i32.const 96) (i32.const 35))))
