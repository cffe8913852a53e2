;; host_calls_start_loop.wat — a start function that never returns.
;;
;; Why: the start function runs while the module is instantiated, before any
;; export is called. The epoch deadline stops it as it stops any guest code,
;; and that is a timeout (504), not a guest that "failed to start" (500).
;;
;; Output:  none: the deadline ends it before `_start` is reached.
(module
  (memory (export "memory") 1)

  (func $spin
    (loop $forever
      (br $forever)))

  (start $spin)

  (func (export "_start")))
