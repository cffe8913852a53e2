;; attack_routes_sleep.wat — a `_routes` export that sleeps 0.9 s before printing its route.
;;
;; Why: issue 10, hole 5. Wherever `_routes` runs, it runs for as long as the tenant's
;; timeout_ms allows; run at reload on a serving path, it stalls every tenant of that worker.
;; Once fixed it runs once per module version, off every serving path. 0.9 s stays inside the
;; attacker's timeout_ms (1000), so the upload succeeds and every worker loads the module.
;;
;; Output of _routes:  /slept _start
;; Output of _start:   content-type: text/plain, blank line, "slept\n"
;;
;; Memory:  0..7 iovec {ptr, len}; 8..11 bytes written; 16.. the outputs;
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
  (global $SLEEP_NS i64 (i64.const 900_000_000))
  (global $CLOCK_MONOTONIC i32 (i32.const 1))

  (data (i32.const 192) "/slept _start\n")                       ;; 14 bytes
  (data (i32.const 256) "content-type: text/plain\n\nslept\n")   ;; 32 bytes

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
    (call $print (i32.const 192) (i32.const 14)))

  (func (export "_start")
    (call $print (i32.const 256) (i32.const 32))))
