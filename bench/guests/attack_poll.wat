;; attack_poll.wat — poll_oneoff with 4,096 clock subscriptions, in a loop, forever.
;;
;; Why: issue 10, hole 6. Each call is host work the guest does not pay for in fuel and,
;; in a Python host, work that holds the GIL every other tenant of the worker needs. Once
;; fixed: more than max_poll_subscriptions fails with EINVAL, the work is charged to fuel and
;; the deadline (timeout_ms) is checked inside the call, so the request ends 503 or 504 on time.
;;
;; Memory:  0..196607 4,096 subscriptions of 48 bytes (clock, monotonic, timeout 0);
;;          196608..327679 4,096 events of 32 bytes; 327680..327683 events written.
(module
  (import "wasi_snapshot_preview1" "poll_oneoff"
    (func $poll_oneoff (param $in i32) (param $out i32) (param $nsubscriptions i32)
                       (param $nevents i32) (result i32)))

  (memory (export "memory") 6)

  (global $SUBSCRIPTIONS i32 (i32.const 0))
  (global $SUBSCRIPTION_COUNT i32 (i32.const 4096))
  (global $EVENTS i32 (i32.const 196608))
  (global $EVENTS_WRITTEN i32 (i32.const 327680))
  (global $CLOCK_MONOTONIC i32 (i32.const 1))

  (func (export "_start")
    (local $i i32)
    ;; subscription: userdata u64 @0; tag u8 @8 (0 = clock); clock id u32 @16;
    ;; timeout u64 @24 (0: due at once); precision u64 @32; flags u16 @40 (0 = relative).
    (loop $fill
      (i32.store offset=16
        (i32.add (global.get $SUBSCRIPTIONS) (i32.mul (local.get $i) (i32.const 48)))
        (global.get $CLOCK_MONOTONIC))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br_if $fill (i32.lt_u (local.get $i) (global.get $SUBSCRIPTION_COUNT))))
    (loop $forever
      (drop (call $poll_oneoff (global.get $SUBSCRIPTIONS) (global.get $EVENTS)
                               (global.get $SUBSCRIPTION_COUNT) (global.get $EVENTS_WRITTEN)))
      (br $forever))))
