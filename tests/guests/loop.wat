;; loop.wat — spins forever, calling nothing.
;;
;; Why: the guest that never returns. Fuel must stop it (503) and so must the
;; wall-clock deadline (504) when fuel is plentiful; either way the worker
;; thread comes back and the pod keeps serving.
;;
;; Output:  nothing.
(module
  (memory (export "memory") 1)

  (func (export "_start")
    (loop $forever
      (br $forever))))
