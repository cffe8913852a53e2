;; host_calls_poll_loop.wat — calls poll_oneoff with 64 subscriptions, all due
;; at once, forever.
;;
;; Why: each call is host work (holding the GIL) that the guest's own
;; instructions hardly pay for. Charged to the guest's fuel, the loop ends
;; with 503 when the fuel is spent, long before its deadline.
;;
;; Output:  none: fuel or the deadline ends it.
;;
;; Memory:  0..3071 64 subscriptions (zeros: clock 0, timeout 0, relative);
;;          4096..6143 their events; 8192..8195 event count.
(module
  (import "wasi_snapshot_preview1" "poll_oneoff"
    (func $poll_oneoff (param $in i32) (param $out i32) (param $nsubscriptions i32)
                       (param $nevents i32) (result i32)))

  (memory (export "memory") 1)

  (func (export "_start")
    (loop $again
      (drop (call $poll_oneoff (i32.const 0) (i32.const 4096) (i32.const 64) (i32.const 8192)))
      (br $again))))
